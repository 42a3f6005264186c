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


#: the seed of the held-out validation part (`data.val_fraction`): fixed, so every run of a study,
#: whatever its seed, trains and selects on the same halves
VAL_SEED = 0


def validation_split(data_cfg: Any) -> str:
    """The split a selection reads: "val" (held out of the training file) when `data.val_fraction`
    is set, else "test" (a run without a validation part selects on nothing else)."""
    return "val" if float(getattr(data_cfg, "val_fraction", None) or 0.0) > 0 else "test"


def build_dataset(data_cfg: Any, split: str, train_transforms: bool | None = None) -> Dataset:
    """Open `split` ("train", "val" or "test") of the dataset described by `data_cfg`.

    `data_cfg` keys: `name`, `root` (None: the project's data folder), `input_size`, `channels`,
    `augment`, `val_fraction`, and for subsets `fraction` / `per_class` (train split) or
    `test_fraction` (test split) with `seed`. With `val_fraction` v > 0 a class-balanced share v of
    the training file (drawn with :data:`VAL_SEED`) is the "val" split, seen with the test
    transforms, and "train" is drawn from the rest (`fraction` and `per_class` then apply to the
    rest); the test split is never part of a selection. The returned dataset carries `mpq_info`:
    name, split, size, classes and, for a subset, the hash of its indices.
    """
    spec = get_dataset_spec(str(data_cfg.name))
    root = dataset_root(data_cfg)
    if split not in ("train", "val", "test"):
        raise MPQError(f"a dataset split is train, val or test, not '{split}'")
    val_fraction = float(getattr(data_cfg, "val_fraction", None) or 0.0)
    if split == "val" and val_fraction <= 0:
        raise MPQError(f"dataset '{spec.name}' has no validation split: set data.val_fraction (e.g. 0.1) to hold "
                       f"out that share of the training split")
    if train_transforms is None:
        train_transforms = split == "train"
    transform = build_transform(
        spec,
        input_size=data_cfg.input_size or spec.native_size,
        channels=data_cfg.channels or spec.native_channels,
        train=train_transforms,
        augment=bool(data_cfg.augment),
    )
    source = "test" if split == "test" else "train"
    dataset = spec.open_split(root, source, transform)
    num_classes = spec.num_classes or len(dataset.classes)  # type: ignore[attr-defined]

    info: dict[str, Any] = {"dataset": spec.name, "split": split, "num_classes": num_classes}
    pool = None  # the indices of the file a subset is drawn from (None: all of them)
    if source == "train" and val_fraction > 0:
        targets = targets_of(dataset)
        held = balanced_subset(targets, fraction=val_fraction, seed=VAL_SEED)
        if split == "val":
            dataset = Subset(dataset, held.tolist())
            info.update(source_split="train", val_fraction=val_fraction, indices_hash=indices_hash(held))
            return _finish(dataset, info, train_transforms)
        pool = np.setdiff1d(np.arange(len(targets)), held)
        info.update(val_fraction=val_fraction)
    if split == "train":
        fraction, per_class = data_cfg.fraction, data_cfg.per_class
    else:
        fraction, per_class = data_cfg.test_fraction, None
    if per_class or (fraction is not None and float(fraction) < 1.0):
        targets = targets_of(dataset)
        within = np.arange(len(targets)) if pool is None else pool
        picked = balanced_subset(
            targets[within],
            fraction=None if per_class else float(fraction),
            per_class=int(per_class) if per_class else None,
            seed=int(data_cfg.seed),
        )
        indices = within[picked]
        dataset = Subset(dataset, indices.tolist())
        info.update(fraction=fraction, per_class=per_class, indices_hash=indices_hash(indices))
    elif pool is not None:
        dataset = Subset(dataset, pool.tolist())
        info.update(indices_hash=indices_hash(pool))
    return _finish(dataset, info, train_transforms)


def _finish(dataset: Dataset, info: dict[str, Any], train_transforms: bool) -> Dataset:
    info["size"] = len(dataset)  # type: ignore[arg-type]
    dataset.mpq_info = info  # type: ignore[attr-defined]
    dataset.mpq_train_transforms = bool(train_transforms)  # type: ignore[attr-defined]  (the FFCV loader's pipeline)
    return dataset
