"""The registry of datasets: :class:`DatasetSpec` and `register_dataset`.

The built-in datasets (:mod:`framework.data.datasets`) register themselves here when imported;
:mod:`framework.data.registry` imports them and looks datasets up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetSpec:
    """What the framework needs to know about a dataset.

    `open_split(root, split, transform)` returns a dataset whose `targets` lists every label;
    `num_classes` may be None when it is read from disk (ImageFolder).
    """

    name: str
    open_split: Callable[[Path, str, Any], Dataset]
    native_size: int | None
    native_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None
    kind: str  # "digits" (small gray images) or "natural" (RGB photos, ImageNet-style transforms)
    hflip: bool = False


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add `spec` to the registry under `spec.name`."""
    DATASETS[spec.name] = spec
    return spec
