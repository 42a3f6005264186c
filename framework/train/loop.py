"""The plain training and evaluation loops (any device; under data parallelism each rank runs them
on its shard and the epoch totals are summed over the ranks)."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from framework.dist.process_group import all_reduce_sum, rank
from framework.train.step import TrainingStep


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """The global random streams (Python's, numpy's, torch's on the CPU and on every CUDA device) as
    they were before the block: work inside it (measuring a policy) leaves the training that follows
    the same dropout masks and draws as a run without that work, so rows of a study stay paired."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    step: TrainingStep,
    device: torch.device,
    max_steps: int,
    on_step: Callable[[int, float, float, dict], None] | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """Run at most `max_steps` steps of `step((images, labels)) -> StepOutput` over one pass of
    `loader`, with a progress bar.

    Returns the mean loss and top-1 over the steps taken and their count; `on_step(i, loss, acc,
    info)` is called after each step (for tracking).
    """
    model.train()
    total_loss = total_correct = total_seen = 0.0
    steps = 0
    # a bar on a terminal only: in a Slurm log or a pipe the epoch lines of the log say the same
    bar = tqdm(loader, total=min(len(loader), max_steps), desc=desc, leave=False, dynamic_ncols=True,
               disable=rank() != 0 or not sys.stderr.isatty())
    for images, labels in bar:
        if steps >= max_steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        out = step((images, labels))
        loss, logits, info = out.loss, out.logits, out.info
        steps += 1
        batch_loss = float(loss)
        batch_acc = (logits.argmax(1) == labels).float().mean().item()
        total_loss += batch_loss * len(labels)
        total_correct += batch_acc * len(labels)
        total_seen += len(labels)
        bar.set_postfix(loss=f"{batch_loss:.3f}", acc=f"{batch_acc:.3f}", refresh=False)
        if on_step is not None:
            on_step(steps, batch_loss, batch_acc, info)
    bar.close()
    total_loss, total_correct, total_seen = all_reduce_sum([total_loss, total_correct, total_seen])
    seen = max(total_seen, 1.0)
    return {"loss": total_loss / seen, "top1": total_correct / seen, "steps": steps}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy (a fraction in [0, 1]) and mean cross-entropy over the whole loader."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss = correct = seen = 0.0
    for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                               disable=rank() != 0 or not sys.stderr.isatty()):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss += criterion(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    loss, correct, seen = all_reduce_sum([loss, correct, seen])
    seen = max(seen, 1.0)
    return {"top1": correct / seen, "loss": loss / seen, "samples": int(seen)}
