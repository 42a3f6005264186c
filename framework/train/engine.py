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

from framework.data.loaders import EpochSampler
from framework.dist.process_group import all_reduce_sum, world_size
from framework.track.aim_tracker import NullTracker
from framework.train.checkpoint import save_checkpoint
from framework.train.loop import StepFn, evaluate, train_steps
from framework.train.resume import Interrupted, StopSignals, rng_state, set_rng_state

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
    checkpoint_every: int = 0,
    resume: dict[str, Any] | None = None,
    saver: Callable[[Path, dict[str, Any], dict[str, Any] | None], Path] | None = None,
) -> FitResult:
    """Train for `total_steps` steps (whole epochs of `train_loader`, the last one cut short).

    After each epoch: validation every `val_every` epochs and after the last (`metrics` tracked
    with `context.subset = val_subset`), `ckpt_dir/last` (with `training_state()`, the position in
    the data and the RNG states), and `ckpt_dir/best` at the best validation top-1. Every
    `checkpoint_every` steps, and when SIGTERM/SIGUSR1 arrives, `last` is also written mid-epoch;
    after a signal, :class:`Interrupted` is raised. `resume` (the `training.pt` of such a
    checkpoint, with the model and optimizers already restored by the caller) continues the run
    at the same step with the same data order.

    Under data parallelism every rank runs `fit` on its shard: the ranks agree after each step on
    whether a stop signal arrived (one all-reduce), validation sums over the ranks, and `saver`
    (default: :func:`save_checkpoint` of `model`) is called on every rank, so a distributed saver
    can write each rank's part.
    """
    if saver is None:
        def saver(path, checkpoint_meta, state):
            return save_checkpoint(path, model, checkpoint_meta, training_state=state)
    distributed = world_size() > 1
    steps_per_epoch = len(train_loader)
    sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochSampler) else None
    epochs = -(-total_steps // steps_per_epoch)
    out = FitResult()
    start_epoch, skip = 1, 0
    if resume is not None:
        position = resume["position"]
        out.steps, start_epoch, skip = int(position["step"]), int(position["epoch"]), int(position["step_in_epoch"])
        out.history, out.best, out.final = list(resume["history"]), dict(resume["best"]), dict(resume.get("final") or {})
        set_rng_state(resume["rng"])
        log.info("resuming at step %d (epoch %d, step %d of it)", out.steps, start_epoch, skip)

    def save_last(epoch: int, step_in_epoch: int, epoch_meta: dict[str, Any]) -> Path:
        state = dict(training_state()) if training_state else {}
        state.update(
            position={"epoch": epoch, "step_in_epoch": step_in_epoch, "step": out.steps},
            history=out.history, best=out.best, final=out.final, rng=rng_state(),
        )
        return saver(ckpt_dir / "last", {**epoch_meta, "step": out.steps}, state)

    with StopSignals() as stop:
        for epoch in range(start_epoch, epochs + 1):
            first = skip if epoch == start_epoch else 0
            if sampler is not None:
                sampler.set_epoch(epoch, first * (train_loader.batch_size or 1))
            base = out.steps
            epoch_meta = {**meta, "epoch": epoch, "metrics": {}}

            def tracked_step(i: int, loss: float, acc: float, info: dict, _base=base, _first=first,
                             _epoch=epoch, _meta=epoch_meta) -> None:
                step = _base + i
                out.steps = step
                if step % track_every == 0:
                    tracker.track("loss", loss, step=step, subset="train")
                    tracker.track("top1", acc, step=step, subset="train")
                    for key, value in info.items():
                        if isinstance(value, (int, float)):
                            tracker.track(key, value, step=step, subset="train")
                if on_step is not None:
                    on_step(step, loss, acc, info)
                in_epoch = _first + i
                if distributed and all_reduce_sum([1.0 if stop.received else 0.0])[0] > 0:
                    stop.received = stop.received or "SIGTERM"  # another rank got it: stop together
                if stop.received or (checkpoint_every and step % checkpoint_every == 0 and in_epoch < steps_per_epoch):
                    path = save_last(_epoch, in_epoch, _meta)
                    if stop.received:
                        raise Interrupted(stop.received, path, step)

            stats = train_steps(model, train_loader, step_fn, device, total_steps - out.steps, tracked_step,
                                desc=f"epoch {epoch}/{epochs}")
            out.steps = base + int(stats["steps"])
            last_epoch = epoch == epochs or out.steps >= total_steps
            entry: dict[str, Any] = {"epoch": epoch, "step": out.steps, "train_loss": stats["loss"], "train_top1": stats["top1"]}
            if epoch % val_every == 0 or last_epoch:
                val = evaluate(model, test_loader, device, desc="validate")
                tracker.track("loss", val["loss"], step=out.steps, subset=val_subset)
                tracker.track("top1", val["top1"], step=out.steps, subset=val_subset)
                entry.update(val_loss=val["loss"], val_top1=val["top1"])
                epoch_meta["metrics"] = {"top1": val["top1"], "loss": val["loss"]}
                out.final = val
                if val["top1"] > out.best["top1"]:
                    out.best = {"top1": val["top1"], "epoch": epoch, "step": out.steps}
                    saver(ckpt_dir / "best", {**epoch_meta, "step": out.steps}, None)
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)
            out.history.append(entry)
            path = save_last(epoch + 1, 0, epoch_meta)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})
            if stop.received:
                raise Interrupted(stop.received, path, out.steps)
            if out.steps >= total_steps:
                break
    return out


def schedule_length(train_loader: DataLoader, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps for `epochs` epochs, capped at `max_steps`."""
    total = int(epochs) * len(train_loader)
    return min(total, int(max_steps)) if max_steps else total
