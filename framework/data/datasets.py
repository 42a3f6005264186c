"""The built-in datasets: Fashion-MNIST, MNIST (installed IDX files) and any ImageFolder tree.

torchvision's dataset classes read the files; `download=False` always, so a missing dataset fails
at once with a message that names the set-up command instead of reaching for the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchvision import datasets as tv_datasets

from framework.data.spec import DatasetSpec, register_dataset
from framework.errors import MPQError
from framework.paths import SETUP_COMMAND

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _idx_opener(cls: type, name: str):
    def open_split(root: Path, split: str, transform: Any):
        if split not in ("train", "test"):
            raise MPQError(f"dataset '{name}' has splits 'train' and 'test', not '{split}'")
        try:
            return cls(root=str(root), train=split == "train", transform=transform, download=False)
        except RuntimeError as err:
            if "not found" not in str(err).lower():
                raise
            raise MPQError(
                f"dataset '{name}' not found under {Path(root) / cls.__name__ / 'raw'}; "
                f"run {SETUP_COMMAND} to install it, or point data.root at a folder that holds "
                f"{cls.__name__}/raw/"
            ) from None

    return open_split


register_dataset(
    DatasetSpec(
        name="fashion_mnist",
        open_split=_idx_opener(tv_datasets.FashionMNIST, "fashion_mnist"),
        native_size=28,
        native_channels=1,
        mean=(0.2860,),
        std=(0.3530,),
        num_classes=10,
        kind="digits",
        hflip=True,
    )
)
register_dataset(
    DatasetSpec(
        name="mnist",
        open_split=_idx_opener(tv_datasets.MNIST, "mnist"),
        native_size=28,
        native_channels=1,
        mean=(0.1307,),
        std=(0.3081,),
        num_classes=10,
        kind="digits",
    )
)

#: folder names tried for each split of an ImageFolder tree, in order (ImageNet uses train/ and val/)
IMAGEFOLDER_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def _open_imagefolder(root: Path, split: str, transform: Any):
    for name in IMAGEFOLDER_SPLIT_DIRS.get(split, (split,)):
        path = Path(root) / name
        if path.is_dir():
            try:
                return tv_datasets.ImageFolder(str(path), transform=transform)
            except (FileNotFoundError, RuntimeError) as err:
                raise MPQError(f"imagefolder split '{split}' at {path} holds no images: {err}") from None
    tried = " or ".join(str(Path(root) / n) for n in IMAGEFOLDER_SPLIT_DIRS.get(split, (split,)))
    raise MPQError(
        f"imagefolder split '{split}' not found: expected a folder {tried} with one sub-folder per class; "
        f"set data.root to the dataset's top folder"
    )


register_dataset(
    DatasetSpec(
        name="imagefolder",
        open_split=_open_imagefolder,
        native_size=None,
        native_channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=None,
        kind="natural",
        hflip=True,
    )
)
