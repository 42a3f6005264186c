"""The epoch loop every training stage shares: steps, validation, tracking, last/best checkpoints.

Stages differ in how one step is taken (plain, two-pass, search) and what a checkpoint records;
`fit` takes those as arguments, so pretrain, search and finetune all train through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.track.aim_tracker import NullTracker
from framework.train.checkpoint import save_checkpoint
from framework.train.loop import StepFn, evaluate, train_steps

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0})
    final: dict[str, Any] = field(default_factory=dict)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    step_fn: StepFn,
    device: torch.device,
    total_steps: int,
    tracker: NullTracker,
    ckpt_dir: Path,
    meta: dict[str, Any],
    val_every: int = 1,
    val_subset: str = "val",
    training_state: Callable[[], dict[str, Any]] | None = None,
    on_step: Callable[[int, float, float, dict], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    track_every: int = 10,
) -> FitResult:
    """Train for `total_steps` steps (whole epochs of `train_loader`, the last one cut short).

    After each epoch: validation every `val_every` epochs and after the last (`metrics` tracked
    with `context.subset = val_subset`), `ckpt_dir/last` (with `training_state()`), and
    `ckpt_dir/best` at the best validation top-1.
    """
    epochs = -(-total_steps // len(train_loader))
    out = FitResult()
    for epoch in range(1, epochs + 1):

        def tracked_step(i: int, loss: float, acc: float, info: dict, _base=out.steps) -> None:
            step = _base + i
            if step % track_every == 0:
                tracker.track("loss", loss, step=step, subset="train")
                tracker.track("top1", acc, step=step, subset="train")
                for key, value in info.items():
                    if isinstance(value, (int, float)):
                        tracker.track(key, value, step=step, subset="train")
            if on_step is not None:
                on_step(step, loss, acc, info)

        stats = train_steps(model, train_loader, step_fn, device, total_steps - out.steps, tracked_step,
                            desc=f"epoch {epoch}/{epochs}")
        out.steps += int(stats["steps"])
        last_epoch = epoch == epochs or out.steps >= total_steps
        entry: dict[str, Any] = {"epoch": epoch, "step": out.steps, "train_loss": stats["loss"], "train_top1": stats["top1"]}
        epoch_meta = {**meta, "epoch": epoch, "step": out.steps, "metrics": {}}
        if epoch % val_every == 0 or last_epoch:
            val = evaluate(model, test_loader, device, desc="validate")
            tracker.track("loss", val["loss"], step=out.steps, subset=val_subset)
            tracker.track("top1", val["top1"], step=out.steps, subset=val_subset)
            entry.update(val_loss=val["loss"], val_top1=val["top1"])
            epoch_meta["metrics"] = {"top1": val["top1"], "loss": val["loss"]}
            out.final = val
            if val["top1"] > out.best["top1"]:
                out.best = {"top1": val["top1"], "epoch": epoch, "step": out.steps}
                save_checkpoint(ckpt_dir / "best", model, epoch_meta)
        if on_epoch_end is not None:
            on_epoch_end(epoch, entry)
        save_checkpoint(ckpt_dir / "last", model, epoch_meta, training_state=training_state() if training_state else None)
        out.history.append(entry)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})
        if out.steps >= total_steps:
            break
    return out


def schedule_length(train_loader: DataLoader, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps for `epochs` epochs, capped at `max_steps`."""
    total = int(epochs) * len(train_loader)
    return min(total, int(max_steps)) if max_steps else total
