"""The datasets load the real installed files with the published sizes and labels."""

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from framework.data import build_dataset, validation_split
from framework.data.registry import targets_of
from framework.errors import MPQError
from tests.conftest import make_image_tree

# Published class counts of MNIST (LeCun et al.); Fashion-MNIST is exactly balanced (Xiao et al. 2017).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def data_cfg(name, **kw):
    base = {"name": name, "root": None, "input_size": None, "channels": None, "fraction": 1.0,
            "per_class": None, "test_fraction": 1.0, "val_fraction": 0.0, "seed": 0, "augment": False, "loader": "torch", "num_workers": 0}
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("split,size,per_class", [("train", 60000, 6000), ("test", 10000, 1000)])
def test_fashion_mnist_sizes_and_balanced_labels(split, size, per_class):
    ds = build_dataset(data_cfg("fashion_mnist"), split)
    assert len(ds) == size
    assert Counter(targets_of(ds).tolist()) == {c: per_class for c in range(10)}
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == targets_of(ds)[0]  # the labels the balanced subsets are drawn from are the items' own


@pytest.mark.parametrize("split,counts", [("train", MNIST_TRAIN_COUNTS), ("test", MNIST_TEST_COUNTS)])
def test_mnist_sizes_and_published_label_counts(split, counts):
    ds = build_dataset(data_cfg("mnist"), split)
    assert len(ds) == sum(counts)
    found = Counter(targets_of(ds).tolist())
    assert [found[c] for c in range(10)] == counts


def test_input_size_and_channels_resize_and_replicate():
    ds = build_dataset(data_cfg("mnist", input_size=32, channels=3), "test")
    image, _ = ds[0]
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image[0], image[1]) and torch.allclose(image[1], image[2])


def test_fraction_gives_a_balanced_subset_with_a_hash():
    ds = build_dataset(data_cfg("fashion_mnist", fraction=0.01, seed=3), "train")
    assert len(ds) == 600
    assert set(Counter(targets_of(ds).tolist()).values()) == {60}
    assert len(ds.mpq_info["indices_hash"]) == 16


def test_missing_dataset_names_the_setup_command(tmp_path):
    with pytest.raises(MPQError, match=r"fashion_mnist.*make setup"):
        build_dataset(data_cfg("fashion_mnist", root=str(tmp_path / "nowhere")), "train")


def test_imagefolder_reads_train_and_val_trees(tmp_path):
    make_image_tree(tmp_path)
    cfg = data_cfg("imagefolder", root=str(tmp_path), input_size=24, channels=3)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 12 and len(test) == 12
    assert train.mpq_info["num_classes"] == 3
    assert train[0][0].shape == (3, 24, 24) and test[0][0].shape == (3, 24, 24)
    assert sorted(set(targets_of(test).tolist())) == [0, 1, 2]


def test_imagefolder_without_a_tree_is_a_clear_error(tmp_path):
    with pytest.raises(MPQError, match="data.root"):
        build_dataset(data_cfg("imagefolder", root=str(tmp_path)), "train")


def test_unknown_dataset_lists_the_registered_ones():
    with pytest.raises(MPQError, match="fashion_mnist"):
        build_dataset(data_cfg("cifar10"), "train")


def test_the_validation_split_is_a_fixed_balanced_share_of_the_training_file_never_trained_on():
    """data.val_fraction: selections read held-out training images, the same ones whatever the run's seed."""
    cfg = data_cfg("fashion_mnist", val_fraction=0.1, seed=0)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 54000 and len(val) == 6000
    assert Counter(targets_of(val).tolist()) == {c: 600 for c in range(10)}
    assert not set(train.indices) & set(val.indices) and len(set(train.indices) | set(val.indices)) == 60000
    again = build_dataset(data_cfg("fashion_mnist", val_fraction=0.1, seed=5, fraction=0.1), "val")
    assert again.indices == val.indices  # another seed (and train subset) holds out the same images
    subset = build_dataset(data_cfg("fashion_mnist", val_fraction=0.1, seed=5, fraction=0.1), "train")
    assert len(subset) == 5400 and not set(subset.indices) & set(val.indices)  # the fraction is of the rest
    assert val.mpq_info["split"] == "val" and val.mpq_info["source_split"] == "train"
    assert val.mpq_train_transforms is False  # seen as the test split is: no augmentation
    assert validation_split(cfg) == "val" and validation_split(data_cfg("fashion_mnist")) == "test"


def test_a_validation_split_without_a_share_is_a_clear_error():
    with pytest.raises(MPQError, match="data.val_fraction"):
        build_dataset(data_cfg("fashion_mnist"), "val")
