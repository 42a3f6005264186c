"""Data loaders. `data.loader=torch` is torchvision's path through `torch.utils.data.DataLoader`;
`data.loader=ffcv` reads `.beton` files written by `mpq prepare` (:mod:`framework.data.ffcv_loader`)
with the same samplers, so both loaders give the same samples in the same order to the same ranks.

Training loaders draw their order from :class:`EpochSampler`: the permutation of epoch `e` depends
only on `(seed, e)`, and an epoch can start at any position, so a resumed run sees exactly the
batches the interrupted one would have seen.

Under data parallelism the sampler also shards. With micro-batch `b`, accumulation `A` and `W`
ranks, each optimizer step takes the next `G = b * A * W` samples of the permutation and cuts them
into `A * W` micro-batches; rank `r` gets micro-batches `m * W + r` for `m = 0 .. A-1`, in that
order. Hence one process with `A` accumulation steps sees the same micro-batches, in the same
order, as `A` processes without accumulation: the global batches do not depend on how they are
split. A last incomplete global batch is dropped. Evaluation loaders give rank `r` the samples
`r, r + W, r + 2W, ...`, so the ranks cover the split exactly once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.errors import MPQError

LOADERS = ("torch", "ffcv")


class EpochSampler(Sampler[int]):
    """A shuffled order per epoch, reproducible from `(seed, epoch)`, sharded, startable mid-epoch."""

    def __init__(self, size: int, seed: int, generator: torch.Generator | None = None, micro_batch: int | None = None,
                 accumulation: int = 1, rank: int = 0, world_size: int = 1):
        self.size, self.seed = int(size), int(seed)
        self.generator = generator  # the loader's generator (worker seeds) follows the epoch too
        self.micro_batch = int(micro_batch or size)
        self.accumulation, self.rank, self.world_size = int(accumulation), int(rank), int(world_size)
        self.epoch, self.start = 1, 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps(self) -> int:
        """Whole optimizer steps in one epoch."""
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th sample."""
        self.epoch, self.start = int(epoch), int(start)
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch + 7919 * self.rank)

    def permutation(self) -> torch.Tensor:
        """The whole epoch's order of the `size` samples, from `(seed, epoch)` alone."""
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=order)

    def rank_order(self) -> torch.Tensor:
        """This rank's samples of the epoch, in the order it consumes them."""
        perm = self.permutation()[: self.steps * self.global_batch]
        b, a, w = self.micro_batch, self.accumulation, self.world_size
        # [step, micro-step m, rank r, sample] with micro-batch index m * W + r
        return perm.view(self.steps, a, w, b)[:, :, self.rank, :].reshape(-1)

    def __iter__(self):
        return iter(self.rank_order()[self.start:].tolist())

    def __len__(self) -> int:
        return self.steps * self.micro_batch * self.accumulation - self.start


class ShardSampler(Sampler[int]):
    """Rank `r` of `W` reads samples `r, r + W, ...` in order (evaluation)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


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
        sampler: Sampler[int] = EpochSampler(size, int(seed), generator, micro, accumulation, rank, world_size)
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
