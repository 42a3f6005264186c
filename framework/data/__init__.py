"""Datasets (a registry), proxy subsets and loaders."""

from framework.data.loaders import build_loader
from framework.data.proxy import balanced_subset, indices_hash
from framework.data.registry import (
    DATASETS,
    DatasetSpec,
    available_datasets,
    build_dataset,
    get_dataset_spec,
    validation_split,
)

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "available_datasets",
    "balanced_subset",
    "build_dataset",
    "validation_split",
    "build_loader",
    "get_dataset_spec",
    "indices_hash",
]
