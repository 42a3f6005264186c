"""data.loader=ffcv: betons written by `mpq prepare` read back exactly, feed training, shard over
ranks like the torch loader, and fail with one clear error when missing or corrupt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from framework.data import build_dataset, build_loader
from framework.data.beton import beton_path, check_beton, prepare_betons, sidecar_path, write_beton
from framework.errors import MPQError
from tests.conftest import compose_config, make_image_tree


def _data_cfg(*overrides: str):
    return compose_config("pretrain", list(overrides)).data


def _with(data_cfg, **values):
    cfg = data_cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """Fashion-MNIST's test split as a raw beton (the real data; 10k images, a few seconds)."""
    folder = tmp_path_factory.mktemp("betons")
    cfg = _data_cfg("data=fashion_mnist", f"data.ffcv.dir={folder}", "data.test_fraction=0.05", "data.augment=false",
                    "data.ffcv.write.workers=2")
    prepare_betons(cfg, ["test"])
    return cfg


def test_raw_beton_reads_back_identical_pixels_and_labels(tmp_path):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    root = make_image_tree(tmp_path / "tree", per_class=5, size=(36, 28), suffix=".png")
    cfg = _data_cfg("data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}",
                    "data.ffcv.write.mode=raw", "data.ffcv.write.max_resolution=null", "data.ffcv.write.workers=1",
                    "data.val_fraction=0")  # the whole file as the dataset: its rows are the beton's, in order
    report = write_beton(cfg, "train")
    assert report["status"] == "written" and report["samples"] == 15
    source = build_dataset(cfg, "train").samples  # (path, label) in the dataset's order
    loader = Loader(report["path"], batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = zip(*((im.copy(), lab.copy()) for im, lab in loader), strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels).reshape(-1)
    assert labels.tolist() == [label for _, label in source]
    for image, (path, _) in zip(images, source, strict=True):
        assert np.array_equal(image, np.asarray(Image.open(path).convert("RGB")))


def test_ffcv_loader_gives_the_torch_loaders_tensors_on_raw_digits(fmnist):
    """Same samples, same order, same pixels and normalisation: evaluation and (un-augmented) training."""
    dataset = build_dataset(fmnist, "test", train_transforms=False)
    torch_cfg, ffcv_cfg = _with(fmnist, loader="torch"), _with(fmnist, loader="ffcv")
    for train, kwargs in ((False, {}), (True, {"seed": 3, "accumulation": 2})):
        ours, theirs = build_loader(dataset, 32, train, ffcv_cfg, **kwargs), build_loader(dataset, 32, train, torch_cfg, **kwargs)
        if train:
            for loader in (ours, theirs):
                loader.sampler.set_epoch(2, start=64)  # mid-epoch, as a resumed run starts
        assert len(ours) == len(theirs) > 0
        batches = 0
        for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
            assert x.dtype == tx.dtype and y.dtype == ty.dtype == torch.int64
            assert torch.equal(y, ty) and torch.equal(x, tx)
            batches += 1
        assert batches == len(theirs)


def test_three_channels_replicate_gray_as_the_torch_path_does(fmnist):
    cfg = _with(fmnist, channels=3)
    dataset = build_dataset(cfg, "test")
    (x, _), (tx, _) = next(iter(build_loader(dataset, 8, False, _with(cfg, loader="ffcv")))), next(iter(
        build_loader(dataset, 8, False, cfg)))
    assert x.shape == (8, 3, 28, 28) and torch.equal(x, tx)


@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_two_ranks_cover_the_data_without_overlap(fmnist, order):
    """Each rank reads exactly the rows its sampler assigns, disjoint from the other rank's."""
    cfg = _with(fmnist, loader="ffcv")
    cfg.ffcv.order = order
    dataset = build_dataset(cfg, "test", train_transforms=False)
    reference = torch.stack([dataset[i][0] for i in range(len(dataset))])
    seen = []
    for rank in (0, 1):
        loader = build_loader(dataset, 10, True, cfg, seed=1, accumulation=2, rank=rank, world_size=2)
        loader.sampler.set_epoch(1)
        positions = loader.sampler.rank_order()
        images = torch.cat([x for x, _ in loader])
        assert torch.equal(images, reference[positions])
        seen.append(set(positions.tolist()))
    assert not seen[0] & seen[1]
    steps = len(dataset) // 40  # global batch: 10 x 2 accumulation x 2 ranks
    assert len(seen[0] | seen[1]) == steps * 40 >= len(dataset) - 40

    shards = [build_loader(dataset, 16, False, cfg, rank=r, world_size=2) for r in (0, 1)]
    labels = torch.cat([y for shard in shards for _, y in shard])
    assert sorted(labels.tolist()) == sorted(int(dataset[i][1]) for i in range(len(dataset)))


def test_quasi_random_order_is_a_function_of_seed_and_epoch(fmnist):
    cfg = _with(fmnist, loader="ffcv")
    cfg.ffcv.order = "quasi_random"
    dataset = build_dataset(cfg, "test")
    sampler = build_loader(dataset, 10, True, cfg, seed=4).sampler
    sampler.set_epoch(3)
    first = sampler.permutation()
    sampler.set_epoch(1)
    sampler.permutation()
    sampler.set_epoch(3)
    assert torch.equal(sampler.permutation(), first)
    assert sorted(first.tolist()) == list(range(len(dataset)))


def test_missing_beton_is_one_clear_error(tmp_path):
    cfg = _data_cfg("data=fashion_mnist", "data.loader=ffcv", f"data.ffcv.dir={tmp_path}", "data.test_fraction=0.01")
    dataset = build_dataset(cfg, "test")
    with pytest.raises(MPQError) as err:
        build_loader(dataset, 8, False, cfg)
    message = str(err.value)
    assert str(beton_path(cfg, "test")) in message
    assert "mpq prepare data=fashion_mnist" in message and f"data.ffcv.dir={tmp_path}" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_sidecar"])
def test_corrupt_beton_is_one_clear_error(fmnist, tmp_path, damage):
    import shutil

    source = beton_path(fmnist, "test")
    cfg = _with(fmnist, loader="ffcv")
    cfg.ffcv.dir = str(tmp_path)
    path = beton_path(cfg, "test")
    path.parent.mkdir(parents=True)
    shutil.copy(source, path)
    shutil.copy(sidecar_path(source), sidecar_path(path))
    if damage == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    elif damage == "garbage":
        size = path.stat().st_size
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        sidecar_path(path).unlink()
    dataset = build_dataset(cfg, "test")
    with pytest.raises(MPQError) as err:
        build_loader(dataset, 8, False, cfg)
    assert str(path) in str(err.value) and "prepare.force=true" in str(err.value)


def test_prepare_skips_whole_files_and_force_rewrites(fmnist):
    path = beton_path(fmnist, "test")
    before = path.stat().st_mtime_ns
    assert write_beton(fmnist, "test")["status"] == "skipped"
    assert path.stat().st_mtime_ns == before
    assert write_beton(fmnist, "test", force=True)["status"] == "written"
    check_beton(fmnist, "test", 10_000)


def test_a_last_batch_of_one_sample_is_still_a_batch(fmnist):
    dataset = build_dataset(fmnist, "test", train_transforms=False)
    batch = len(dataset) - 1  # two batches: all but one sample, then one
    ours = list(build_loader(dataset, batch, False, _with(fmnist, loader="ffcv")))
    theirs = list(build_loader(dataset, batch, False, _with(fmnist, loader="torch")))
    assert [y.shape for _, y in ours] == [y.shape for _, y in theirs] == [(batch,), (1,)]
    assert torch.equal(ours[1][1], theirs[1][1]) and torch.equal(ours[1][0], theirs[1][0])


def test_the_model_keeps_the_runs_threads(fmnist):
    """FFCV sets torch's thread count to its decoding threads; the run's `threads` must survive it."""
    dataset = build_dataset(fmnist, "test", train_transforms=False)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    torch.set_num_threads(wanted)
    try:
        loader = build_loader(dataset, 64, True, _with(_with(fmnist, loader="ffcv"), num_workers=1), seed=0)
        assert torch.get_num_threads() == wanted
        for _ in loader:
            assert torch.get_num_threads() == wanted
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_a_tree_with_other_classes_is_refused(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=2, per_class=2, suffix=".png")
    cfg = _data_cfg("data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}",
                    "data.ffcv.write.mode=raw", "data.ffcv.write.workers=1", "data.loader=ffcv")
    prepare_betons(cfg, "train")  # one split, given as a string
    (root / "train" / "class_1").rename(root / "train" / "class_9")  # same count, other classes
    with pytest.raises(MPQError, match=r"other classes .*prepare.force=true"):
        build_loader(build_dataset(cfg, "train"), 2, True, cfg)


@pytest.mark.parametrize("override, message", [
    ("prepare.splits=[train,valid]", r"prepare.splits=.*unknown or no split \['valid'\]"),
    ("data.ffcv.write.jpeg_quality=0", r"data.ffcv.write.jpeg_quality=0"),
])
def test_bad_prepare_options_are_one_error_before_writing(tmp_path, override, message):
    from framework.config import validate_config
    from framework.stages.prepare import run_prepare

    cfg = compose_config("prepare", ["data=mnist", f"data.ffcv.dir={tmp_path}", "data.ffcv.write.mode=jpg", override,
                                      f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(MPQError, match=message):
        validate_config(cfg)
        run_prepare(cfg)
    assert not list(tmp_path.rglob("*.beton"))


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_the_one_pass_flip_and_normalisation_equals_ffcvs_stock_stages(tmp_path, flip):
    """FlipNormaliseToCHW against RandomHorizontalFlip + NormalizeImage + ToTorchImage: the same floats,
    bit for bit, in N x C x H x W (contiguous) instead of a channels-last view."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    from framework.data.ffcv_ops import FlipNormaliseToCHW

    root = make_image_tree(tmp_path / "tree", per_class=3, size=(36, 28), suffix=".png")
    cfg = _data_cfg("data=imagefolder", f"data.root={root}", f"data.ffcv.dir={tmp_path / 'betons'}",
                    "data.ffcv.write.mode=raw", "data.ffcv.write.max_resolution=null", "data.ffcv.write.workers=1")
    path = write_beton(cfg, "train")["path"]
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255

    def batches(image_pipeline):
        loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder(), *image_pipeline], "label": [IntDecoder()]})
        return torch.cat([images.clone() for images, _ in loader])

    stock = [*([RandomHorizontalFlip(1.0)] if flip else []), NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    expected = batches(stock)
    fused = batches([FlipNormaliseToCHW(mean, std, flip_prob=flip), ToTensor()])
    assert fused.shape == expected.shape == (9, 3, 28, 36) and fused.dtype == torch.float32
    assert fused.is_contiguous()
    assert torch.equal(fused, expected)
    unflipped = batches([FlipNormaliseToCHW(mean, std, flip_prob=0.0), ToTensor()])
    assert torch.equal(unflipped.flip(-1), fused) == bool(flip)


def test_the_photo_decoder_is_an_option_stock_or_area():
    """`data.ffcv.decoder` chooses FFCV's own crop decoders (stock) or the same decode with the
    project's area resize (area, the default: the same bytes, test_area_resize.py); another name is
    refused when the config is validated."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder

    from framework.config.validate import validate_config
    from framework.data import get_dataset_spec
    from framework.data.ffcv_loader import build_pipelines
    from framework.data.ffcv_ops import AreaCenterCrop, AreaRandomResizedCrop

    spec = get_dataset_spec("imagefolder")
    for decoder, (train_cls, eval_cls) in (("stock", (RandomResizedCropRGBImageDecoder, CenterCropRGBImageDecoder)),
                                           ("area", (AreaRandomResizedCrop, AreaCenterCrop))):
        data = compose_config("pretrain", ["data=imagefolder", "data.root=/nonexistent", "data.input_size=32",
                                           f"data.ffcv.decoder={decoder}"]).data
        train, evaluation = (build_pipelines(spec, data, t)["image"][0] for t in (True, False))
        assert type(train) is train_cls and type(evaluation) is eval_cls
    assert compose_config("pretrain").data.ffcv.decoder == "area"
    with pytest.raises(MPQError, match="data.ffcv.decoder.*area, stock"):
        validate_config(compose_config("pretrain", ["data.ffcv.decoder=fast"]))
