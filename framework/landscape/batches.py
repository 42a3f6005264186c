"""The loss the landscape is measured on: mean cross-entropy over fixed batches of a dataset.

    L(w) = (1/N) sum_{i=1..N} CE(f(x_i; w), y_i)

over the N samples of the batches, which are drawn once, from a seed, and held in memory, so every
evaluation of `L` (each Hessian-vector product, each point of a curve) sees the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset


def fixed_batches(dataset: Dataset, batches: int, batch_size: int, seed: int,
                  device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` batches of `batch_size` samples of `dataset` (fewer if it is smaller), a random
    choice without replacement drawn from `seed`, loaded once onto `device` in that order."""
    size = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
    chosen = order[: min(size, int(batches) * int(batch_size))].tolist()
    loader = DataLoader(Subset(dataset, chosen), batch_size=int(batch_size), shuffle=False, num_workers=0)
    return [(images.to(device), labels.to(device)) for images, labels in loader]


class CrossEntropyOnBatches:
    """The loss closure of `L(w)` over fixed batches: called with the model, it yields one term per
    batch, `sum_batch CE / N`, so that the terms sum to `L(w)` (the mean over all N samples)."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = list(batches)
        self.samples = sum(len(labels) for _, labels in self.batches)

    def __call__(self, model: nn.Module) -> Iterator[torch.Tensor]:
        for images, labels in self.batches:
            yield F.cross_entropy(model(images), labels, reduction="sum") / self.samples

    @torch.no_grad()
    def top1(self, model: nn.Module) -> float:
        """The fraction of the samples the model classifies correctly (in the mode it is in)."""
        correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in self.batches)
        return correct / max(self.samples, 1)
