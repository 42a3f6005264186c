"""Data loaders. `data.loader=torch` is torchvision's path through `torch.utils.data.DataLoader`.

Training loaders draw their order from :class:`EpochSampler`: the permutation of epoch `e` depends
only on `(seed, e)`, and an epoch can start at any position, so a resumed run sees exactly the
batches the interrupted one would have seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.errors import MPQError

LOADERS = ("torch",)


class EpochSampler(Sampler[int]):
    """A shuffled order per epoch, reproducible from `(seed, epoch)` and startable mid-epoch."""

    def __init__(self, size: int, seed: int, generator: torch.Generator | None = None):
        self.size, self.seed = int(size), int(seed)
        self.generator = generator  # the loader's generator (worker seeds) follows the epoch too
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its `start`-th sample."""
        self.epoch, self.start = int(epoch), int(start)
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=order)[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start


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
    sampler = EpochSampler(len(dataset), int(seed), generator) if train else None  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )
