"""Datasets by name: the lookups of the registry (:mod:`framework.data.spec`) and the factory.

A dataset is registered by name with a :class:`DatasetSpec` that knows its native geometry, its
normalisation and how to open a split from disk. :func:`build_dataset` turns a `data` (or `proxy`)
config node into a ready `torch.utils.data.Dataset` with the right transforms, optionally reduced to
a class-balanced subset. Nothing here downloads: a missing dataset is one :class:`MPQError` naming
the set-up command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from framework.data.proxy import balanced_subset, indices_hash
from framework.data.spec import DATASETS, DatasetSpec
from framework.data.transforms import build_transform
from framework.errors import MPQError
from framework.paths import default_data_root


def available_datasets() -> list[str]:
    """The registered dataset names (the built-in ones included)."""
    from framework.data import datasets  # noqa: F401  (registers the built-in datasets)

    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or an error listing the registered ones."""
    from framework.data import datasets  # noqa: F401  (registers the built-in datasets)

    if name not in DATASETS:
        raise MPQError(f"unknown dataset '{name}'; registered datasets are: {', '.join(available_datasets())}")
    return DATASETS[name]


def dataset_root(data_cfg: Any) -> Path:
    return Path(data_cfg.root) if data_cfg.root else default_data_root()


def targets_of(dataset: Dataset) -> np.ndarray:
    """Every label of a dataset (or of a `Subset` of one) as an int64 array, without decoding images."""
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise MPQError(f"dataset {type(dataset).__name__} exposes no `targets`; cannot draw a balanced subset")
    return np.asarray(targets, dtype=np.int64)


def build_dataset(data_cfg: Any, split: str, train_transforms: bool | None = None) -> Dataset:
    """Open `split` ("train" or "test") of the dataset described by `data_cfg`.

    `data_cfg` keys: `name`, `root` (None: the project's data folder), `input_size`, `channels`,
    `augment`, and for subsets `fraction` / `per_class` (train split) or `test_fraction` (test split)
    with `seed`. The returned dataset carries `mpq_info`: name, split, size, classes and, for a
    subset, the hash of its indices.
    """
    spec = get_dataset_spec(str(data_cfg.name))
    root = dataset_root(data_cfg)
    if train_transforms is None:
        train_transforms = split == "train"
    transform = build_transform(
        spec,
        input_size=data_cfg.input_size or spec.native_size,
        channels=data_cfg.channels or spec.native_channels,
        train=train_transforms,
        augment=bool(data_cfg.augment),
    )
    dataset = spec.open_split(root, split, transform)
    num_classes = spec.num_classes or len(dataset.classes)  # type: ignore[attr-defined]

    if split == "train":
        fraction, per_class = data_cfg.fraction, data_cfg.per_class
    else:
        fraction, per_class = data_cfg.test_fraction, None
    info: dict[str, Any] = {"dataset": spec.name, "split": split, "num_classes": num_classes}
    if per_class or (fraction is not None and float(fraction) < 1.0):
        indices = balanced_subset(
            targets_of(dataset),
            fraction=None if per_class else float(fraction),
            per_class=int(per_class) if per_class else None,
            seed=int(data_cfg.seed),
        )
        dataset = Subset(dataset, indices.tolist())
        info.update(fraction=fraction, per_class=per_class, indices_hash=indices_hash(indices))
    info["size"] = len(dataset)  # type: ignore[arg-type]
    dataset.mpq_info = info  # type: ignore[attr-defined]
    dataset.mpq_train_transforms = bool(train_transforms)  # type: ignore[attr-defined]  (the FFCV loader's pipeline)
    return dataset
