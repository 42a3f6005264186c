"""Data loaders. `data.loader=torch` is torchvision's path through `torch.utils.data.DataLoader`."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from framework.errors import MPQError

LOADERS = ("torch",)


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, data_cfg: Any, seed: int = 0
) -> DataLoader:
    """A loader over `dataset`; shuffled with a seeded generator (and last partial batch dropped) when training."""
    kind = str(data_cfg.get("loader", "torch"))
    if kind == "ffcv":
        raise MPQError("data.loader=ffcv is not available yet in this version; use data.loader=torch")
    if kind not in LOADERS:
        raise MPQError(f"unknown data.loader '{kind}'; choose one of: torch, ffcv")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    workers = int(data_cfg.get("num_workers", 0) or 0)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )
