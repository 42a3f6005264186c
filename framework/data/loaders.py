"""Data loaders. `data.loader=torch` is torchvision's path through `torch.utils.data.DataLoader`;
`data.loader=ffcv` reads `.beton` files written by `mpq prepare` (:mod:`framework.data.ffcv_loader`)
with the same samplers, so both loaders give the same samples in the same order to the same ranks.

The samplers that fix the order and the sharding are in :mod:`framework.data.samplers`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from framework.data.samplers import EpochSampler, ShardSampler
from framework.errors import MPQError

__all__ = ["LOADERS", "EpochSampler", "ShardSampler", "build_loader"]

LOADERS = ("torch", "ffcv")


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, data_cfg: Any, seed: int = 0,
    accumulation: int = 1, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """A loader over `dataset` for rank `rank` of `world_size` (`data_cfg.loader`: torch or ffcv).

    Training: shuffled by :class:`EpochSampler` with micro-batch `batch_size`; each loader batch holds
    the `accumulation` micro-batches of one optimizer step (`batch_size * accumulation` samples).
    Evaluation: this rank's shard in order, batches of `batch_size`.
    """
    kind = str(data_cfg.loader)
    if kind == "ffcv":
        from framework.data.ffcv_loader import build_ffcv_loader

        return build_ffcv_loader(dataset, batch_size, train, data_cfg, seed=seed, accumulation=accumulation,
                                 rank=rank, world_size=world_size)
    if kind not in LOADERS:
        raise MPQError(f"unknown data.loader '{kind}'; choose one of: torch, ffcv")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    workers = int(data_cfg.num_workers)
    size = len(dataset)  # type: ignore[arg-type]
    if train:
        micro = min(int(batch_size), size)
        sampler: torch.utils.data.Sampler[int] = EpochSampler(size, int(seed), generator, micro, accumulation, rank, world_size)
        loader_batch = micro * int(accumulation)
    else:
        sampler, loader_batch = ShardSampler(size, rank, world_size), int(batch_size)
    return DataLoader(
        dataset,
        batch_size=loader_batch,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )
