"""`data.loader=ffcv`: FFCV loaders over the `.beton` files `mpq prepare` writes.

The loader keeps the torch loader's contract (:func:`framework.data.build_loader`): it yields
`(images, labels)` float/int64 tensors, a training batch holds the `accumulation` micro-batches of
one optimizer step, `len()` is the number of batches, and `loader.sampler` is the same
:class:`EpochSampler` (training) or :class:`ShardSampler` (evaluation), so `sampler.set_epoch(epoch,
start)` resumes mid-epoch exactly as with the torch loader.

Order and sharding. FFCV's own orders are not used to pick samples: each epoch the sampler computes
this rank's sample positions (the same code as the torch loader's), they are mapped to the rows of
the beton (a subset such as `data.fraction` or a proxy is a list of rows), and FFCV reads exactly that
list, in that order (:class:`_explicit_order_loader`). Hence for a given seed both loaders give every
rank the same samples in the same order, the ranks' shards are disjoint, a resumed epoch continues at
the same sample, and the global batches do not depend on how they are split over ranks and
accumulation steps. `data.ffcv.order`:

- `random` (default): the torch loader's permutation from `(seed, epoch)`. The default because
  switching the loader then changes nothing in what the model sees but the augmentation draws, and
  with the beton in the page cache (`os_cache=true`, FFCV's default) random reads cost nothing;
- `quasi_random`: FFCV's page-aware shuffle (samples drawn from a few pages at a time, so a set larger
  than RAM is read nearly sequentially; use it with `os_cache=false`). Its permutation is computed by
  FFCV's own routine from `(seed, epoch)` on fresh copies of the page tables (FFCV's QuasiRandom
  shuffles them in place, so its order would depend on the epochs drawn before), then sharded like
  `random`: also exactly resumable mid-epoch.

Pipelines (decoding and augmentation in FFCV's compiled code, the last steps in torch):

- digits (MNIST, Fashion-MNIST; stored as RGB with the gray value replicated): decode, and when
  training with `augment` a translation by up to 2 pixels with zero fill (torchvision's
  `RandomCrop(28, padding=2)`) and, for Fashion-MNIST, a horizontal flip;
- natural images (ImageFolder): training `RandomResizedCropRGBImageDecoder` (scale 0.08-1, ratio
  3/4-4/3, as torchvision's) and a flip; evaluation `CenterCropRGBImageDecoder` with ratio 0.875 (the
  torch path's resize to `size / 0.875` and centre crop); both as their faster equivalents of
  :mod:`framework.data.ffcv_ops` (the same bytes);
- then `ToTensor`, `ToDevice` when CUDA is available, `ToTorchImage`, and :class:`ToModelInput`:
  channels (`data.channels`: gray datasets take their stored channel back, bit for bit; RGB photos
  become gray with torchvision's weights), scaling to [0, 1], resizing digits to `data.input_size`,
  normalisation with the dataset's mean and std. RGB photos on the CPU instead take one compiled
  stage after the decoder, :class:`~framework.data.ffcv_ops.FlipNormaliseToCHW`: the flip, the
  lookup-table normalisation and the N x C x H x W layout in a single pass.

For raw digits without resizing the tensors equal the torch loader's bit for bit (same pixels, same
normalisation arithmetic); photos differ by the interpolation's rounding (OpenCV's area resize
against PIL's antialiased bilinear), JPEG betons also by the codec's.
The random augmentation draws come from FFCV's generator, not from the run's seed, so they are not
reproduced by a resume (the sample order is).

`data.num_workers` is FFCV's decoding threads (0 means 1: FFCV has no in-process mode; at most the
cores numba sees). FFCV sets torch's thread count to its own worker count; the loader puts the run's
back, so the model's compute keeps `threads`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from framework.data.beton import check_beton
from framework.data.registry import get_dataset_spec
from framework.data.samplers import EpochSampler, ShardSampler
from framework.data.spec import DatasetSpec
from framework.data.transforms import _normalise
from framework.errors import MPQError


class ToModelInput(nn.Module):
    """uint8 N x C x H x W from FFCV -> the float tensor the model takes (see the module docstring)."""

    def __init__(self, gray_source: bool, channels: int, resize: int | None, mean, std):
        super().__init__()
        self.gray_source, self.channels, self.resize = gray_source, int(channels), resize
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            if self.gray_source:
                images = images[:, :1]
            else:
                from torchvision.transforms.functional import rgb_to_grayscale

                images = rgb_to_grayscale(images, num_output_channels=1)
        x = images.float().div(255)  # torchvision's ToTensor
        if self.resize:
            x = nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=True,
                                          align_corners=False)
        return x.sub(self.mean.to(x.device)).div(self.std.to(x.device))  # torchvision's Normalize


def _device() -> torch.device | None:
    """Where FFCV puts the batches: the current CUDA device when there is one, else None (the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


#: `data.ffcv.decoder`: FFCV's own crop decoders for photos (stock), or the same decode with this
#: project's area resize (area: the same output bytes, about twice as fast; framework/data/ffcv_ops.py)
PHOTO_DECODERS = ("area", "stock")


def photo_decoders(name: str) -> tuple[type, type]:
    """The (random-resized-crop, center-crop) decoder classes `data.ffcv.decoder=name` names."""
    if name == "stock":
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder

        return RandomResizedCropRGBImageDecoder, CenterCropRGBImageDecoder
    if name == "area":
        from framework.data.ffcv_ops import AreaCenterCrop, AreaRandomResizedCrop

        return AreaRandomResizedCrop, AreaCenterCrop
    raise ValueError(f"unknown FFCV photo decoder '{name}'; choose one of {PHOTO_DECODERS}")


def build_pipelines(spec: DatasetSpec, data_cfg: Any, train: bool) -> dict[str, list]:
    """FFCV pipelines for the `image` and `label` fields (training or evaluation transforms)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import (
        RandomHorizontalFlip,
        RandomTranslate,
        Squeeze,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    channels = int(data_cfg.channels or spec.native_channels)
    augment = train and bool(data_cfg.augment)
    resize = None
    if spec.kind == "digits":
        size = int(data_cfg.input_size or spec.native_size)
        image: list = [SimpleRGBImageDecoder()]
        if augment:
            image.append(RandomTranslate(padding=2, fill=(0, 0, 0)))
            if spec.hflip:
                image.append(RandomHorizontalFlip())
        resize = size if size != spec.native_size else None
    else:
        size = int(data_cfg.input_size or 224)
        random_crop, center_crop = photo_decoders(str(data_cfg.ffcv.get("decoder", "area")))
        image = [random_crop((size, size))] if augment else [center_crop((size, size), ratio=0.875)]
    device = _device()
    to_device = [ToDevice(device, non_blocking=True)] if device is not None else []
    norm = _normalise(spec, channels)
    if spec.kind != "digits" and channels == 3 and device is None:
        # photos on the CPU: the flip, the lookup-table normalisation and the N x C x H x W layout in
        # one compiled pass in the decoding threads (framework/data/ffcv_ops.py; it equals
        # torchvision's normalisation up to float rounding, ~1e-7)
        from framework.data.ffcv_ops import FlipNormaliseToCHW

        scale = 255 * np.asarray(norm.mean), 255 * np.asarray(norm.std)
        image += [FlipNormaliseToCHW(scale[0], scale[1], flip_prob=0.5 if augment else 0.0), ToTensor()]
    else:
        if spec.kind != "digits" and augment:
            image.append(RandomHorizontalFlip())
        image += [ToTensor(), *to_device, ToTorchImage(),
                  ToModelInput(spec.native_channels == 1, channels, resize, norm.mean, norm.std)]
    label = [IntDecoder(), ToTensor(), Squeeze(1), *to_device]  # N x 1 -> N (a batch of one stays a batch)
    return {"image": image, "label": label}


@functools.cache
def _explicit_order_loader() -> type:
    """An FFCV `Loader` that reads, each epoch, the list of rows in `explicit_order`, in that order.

    FFCV's loader asks its traversal order for the epoch's rows (`next_traversal_order`) and
    batches them; overriding that one method (and `__len__`, which FFCV computes from the first
    epoch's order) lets the framework's samplers decide the order. Built on first use so that
    importing this module does not import FFCV (3-4 s).
    """
    from ffcv.loader import Loader, OrderOption

    class ExplicitOrderLoader(Loader):
        def __init__(self, *args: Any, **kwargs: Any):
            self.explicit_order = np.zeros(0, dtype=np.uint64)
            super().__init__(*args, order=OrderOption.SEQUENTIAL, **kwargs)

        def next_traversal_order(self):
            return self.explicit_order

        def __len__(self) -> int:
            n = len(self.explicit_order)
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    return ExplicitOrderLoader


def _decoding_threads(data_cfg: Any) -> int:
    """`data.num_workers` as FFCV's decoding threads: at least 1 (FFCV has no in-process mode), at most
    the threads numba may start (more is an error inside numba)."""
    import numba

    return min(max(1, int(data_cfg.num_workers)), int(numba.config.NUMBA_NUM_THREADS))


class QuasiRandomSampler(EpochSampler):
    """:class:`EpochSampler` whose epoch permutation is FFCV's page-aware quasi-random order."""

    def __init__(self, loader: Any, rows: np.ndarray, *args: Any, **kwargs: Any):
        from ffcv.traversal_order.quasi_random import QuasiRandom

        super().__init__(*args, **kwargs)
        self._pages = QuasiRandom(loader)  # page tables of the loader's rows (its `indices`)
        self._sorter = np.argsort(rows, kind="stable")
        self._rows = rows

    def permutation(self) -> torch.Tensor:
        from ffcv.traversal_order.quasi_random import generate_order_inner

        order = np.zeros(self.size, dtype=np.int64)
        generate_order_inner(self.seed * 912_300 + self.epoch, self._pages.page_to_samples_array.copy(),
                             self._pages.page_sizes.copy(), order, 2 * self.global_batch)
        positions = self._sorter[np.searchsorted(self._rows, order, sorter=self._sorter)]
        return torch.from_numpy(positions.astype(np.int64))


class FFCVLoader:
    """The FFCV loader of one split for one rank, with the torch loader's interface (see the module)."""

    def __init__(self, loader: Any, sampler: EpochSampler | ShardSampler, rows: np.ndarray, batch_size: int,
                 dataset: Dataset, beton: str):
        self.loader, self.sampler, self.rows = loader, sampler, rows
        self.batch_size, self.dataset, self.beton = int(batch_size), dataset, beton

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        positions = np.fromiter(iter(self.sampler), dtype=np.int64)
        self.loader.explicit_order = self.rows[positions].astype(np.uint64)
        threads = torch.get_num_threads()
        epoch = iter(self.loader)
        try:
            for images, labels in epoch:
                # FFCV sets torch's (process-wide) thread count to its own worker count when an epoch
                # starts, in the main thread and in its loading thread, before the first batch is
                # made; the model's compute keeps the run's `threads`
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                # FFCV reuses its buffers `batches_ahead + 2` batches later: labels are copied (they are
                # small); images are valid until then (ToModelInput makes fresh tensors, but photos on
                # the CPU come straight from FFCV's buffers: copy them to keep a batch longer)
                yield images, labels.clone()
        finally:
            epoch.close()
            torch.set_num_threads(threads)


def rows_of(dataset: Dataset) -> tuple[np.ndarray, int]:
    """The beton rows of `dataset`'s samples (a `Subset` is a list of rows) and the full split's size."""
    if isinstance(dataset, Subset):
        base = dataset.dataset
        return np.asarray(dataset.indices, dtype=np.int64), len(base)  # type: ignore[arg-type]
    size = len(dataset)  # type: ignore[arg-type]
    return np.arange(size, dtype=np.int64), size


def build_ffcv_loader(dataset: Dataset, batch_size: int, train: bool, data_cfg: Any, seed: int = 0,
                      accumulation: int = 1, rank: int = 0, world_size: int = 1) -> FFCVLoader:
    """The FFCV counterpart of :func:`framework.data.build_loader` (same arguments, same batches).

    `dataset` comes from :func:`framework.data.build_dataset` (its `mpq_info` names the dataset and
    split, a `Subset` gives the rows); the beton is found from `data_cfg` (:func:`beton_path`) and
    checked first (:func:`check_beton`). The transforms follow the dataset's (`train_transforms`).
    """
    info = getattr(dataset, "mpq_info", None)
    if info is None:
        raise MPQError("data.loader=ffcv reads datasets opened by framework.data.build_dataset (they name their split)")
    order = str(data_cfg.ffcv.order)
    spec = get_dataset_spec(info["dataset"])
    rows, split_size = rows_of(dataset)
    whole = dataset.dataset if isinstance(dataset, Subset) else dataset
    # a validation split is rows of the training file's beton
    path, _ = check_beton(data_cfg, info.get("source_split", info["split"]), split_size, getattr(whole, "classes", None))
    size = len(rows)
    if train:
        micro = min(int(batch_size), size)
        loader_batch = micro * int(accumulation)
    else:
        loader_batch = int(batch_size)
    threads = torch.get_num_threads()  # FFCV's Loader sets torch's thread count to its workers'
    loader = _explicit_order_loader()(
        str(path), batch_size=loader_batch, num_workers=_decoding_threads(data_cfg),
        os_cache=bool(data_cfg.ffcv.os_cache), seed=int(seed), indices=rows.astype(np.uint64),
        pipelines=build_pipelines(spec, data_cfg, bool(getattr(dataset, "mpq_train_transforms", train))),
        drop_last=False, batches_ahead=int(data_cfg.ffcv.batches_ahead),
    )
    torch.set_num_threads(threads)
    sampler: EpochSampler | ShardSampler
    if not train:
        sampler = ShardSampler(size, rank, world_size)
    elif order == "quasi_random":
        sampler = QuasiRandomSampler(loader, rows, size, int(seed), None, micro, accumulation, rank, world_size)
    else:
        sampler = EpochSampler(size, int(seed), None, micro, accumulation, rank, world_size)
    return FFCVLoader(loader, sampler, rows, loader_batch, dataset, str(path))
