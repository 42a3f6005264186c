"""The epoch loop every training stage shares: steps, validation, tracking, last/best checkpoints.

Stages differ in how one step is taken (:class:`~framework.train.step.TrainingStep`: the DeepSpeed
step of pretrain/finetune, the search step), in what a run records (:class:`FitPlan`) and in what
they add per step or per epoch (hooks); `fit` takes those as arguments, so pretrain, search and
finetune all train through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.data.loaders import EpochSampler
from framework.dist.process_group import all_reduce_sum, world_size
from framework.track.aim_tracker import NullTracker
from framework.train.checkpoint import save_checkpoint
from framework.train.loop import evaluate, train_steps
from framework.train.resume import Interrupted, StopSignals, rng_state, set_rng_state
from framework.train.step import TrainingStep

log = logging.getLogger(__name__)

Saver = Callable[[Path, dict[str, Any], dict[str, Any] | None], Path]


class Loaders(NamedTuple):
    """`val` is what validation (and the `best` checkpoint) reads; `test`, when given, is scored once
    after the last epoch and is the run's final result. Without `test`, `val` is both (a run with no
    held-out validation part)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader | None = None


@dataclass
class FitPlan:
    """What a run does besides stepping: its length, validation, checkpoints and tracking.

    `total_steps` optimizer steps on `device`; validation every `val_every` epochs and after the
    last, tracked with `context.subset = val_subset`; the training loss, top-1 and the step's float
    metrics tracked every `track_every` steps; `checkpoint_dir/last` after every epoch and also
    every `checkpoint_every` steps (0: only at epoch ends and on a stop signal), `checkpoint_dir/best`
    at the best validation top-1, each with `meta` (plus epoch, step, metrics). `saver(path, meta,
    training_state)` writes one checkpoint (default: :func:`save_checkpoint` of the model).
    """

    total_steps: int
    device: torch.device
    checkpoint_dir: Path
    meta: dict[str, Any]
    tracker: NullTracker = field(default_factory=NullTracker)
    val_every: int = 1
    val_subset: str = "val"
    checkpoint_every: int = 0
    track_every: int = 10
    saver: Saver | None = None


class Hook:
    """What a stage adds to the loop. `fit` calls `on_step` after every step (`step` counts from 1
    over the run; `loss` and `top1` are this rank's batch values) and `on_epoch_end` after the
    epoch's validation, before the epoch's entry (which it may extend) joins the history and
    `last` is written. Any object with either method is a hook; this class does nothing."""

    def on_step(self, step: int, loss: float, top1: float, info: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, entry: dict[str, Any]) -> None:
        pass


class Callbacks(Hook):
    """A hook made of plain functions: `Callbacks(on_epoch_end=fn)`."""

    def __init__(self, on_step: Callable[[int, float, float, dict], None] | None = None,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None):
        self._on_step, self._on_epoch_end = on_step, on_epoch_end

    def on_step(self, step: int, loss: float, top1: float, info: dict[str, float]) -> None:
        if self._on_step is not None:
            self._on_step(step, loss, top1, info)

    def on_epoch_end(self, epoch: int, entry: dict[str, Any]) -> None:
        if self._on_epoch_end is not None:
            self._on_epoch_end(epoch, entry)


@dataclass
class FitResult:
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0})
    final: dict[str, Any] = field(default_factory=dict)


def fit(model: nn.Module, loaders: Loaders, step: TrainingStep, plan: FitPlan, hooks: Iterable[Any] = (),
        resume: dict[str, Any] | None = None) -> FitResult:
    """Train for `plan.total_steps` steps (whole epochs of `loaders.train`, the last one cut short).

    After each epoch: validation on `loaders.val` (see :class:`FitPlan` for the cadence), the hooks'
    `on_epoch_end`, `last` (with `step.state_dict()`, the position in the data, the history and the
    RNG states) and `best`. When SIGTERM/SIGUSR1 arrives, `last` is written after the current step
    and :class:`Interrupted` is raised. `resume` (the `training.pt` of such a checkpoint, with the
    model's weights and the step's state already restored by the caller) continues the run at the
    same step with the same data order.

    Under data parallelism every rank runs `fit` on its shard: the ranks agree after each step on
    whether a stop signal arrived (one all-reduce), validation sums over the ranks, and the saver
    is called on every rank, so a distributed saver can write each rank's part.
    """
    saver = plan.saver
    if saver is None:
        def saver(path, checkpoint_meta, state):
            return save_checkpoint(path, model, checkpoint_meta, training_state=state)
    on_step = [h.on_step for h in hooks if hasattr(h, "on_step")]
    on_epoch_end = [h.on_epoch_end for h in hooks if hasattr(h, "on_epoch_end")]
    distributed = world_size() > 1
    tracker, total_steps = plan.tracker, plan.total_steps
    train_loader = loaders.train
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
        state = dict(step.state_dict())
        state.update(
            position={"epoch": epoch, "step_in_epoch": step_in_epoch, "step": out.steps},
            history=out.history, best=out.best, final=out.final, rng=rng_state(),
        )
        return saver(plan.checkpoint_dir / "last", {**epoch_meta, "step": out.steps}, state)

    with StopSignals() as stop:
        for epoch in range(start_epoch, epochs + 1):
            first = skip if epoch == start_epoch else 0
            if sampler is not None:
                sampler.set_epoch(epoch, first * (train_loader.batch_size or 1))
            base = out.steps
            epoch_meta = {**plan.meta, "epoch": epoch, "metrics": {}}

            def after_step(i: int, loss: float, acc: float, info: dict, _base=base, _first=first,
                           _epoch=epoch, _meta=epoch_meta) -> None:
                at = _base + i
                out.steps = at
                if at % plan.track_every == 0:
                    tracker.track("loss", loss, step=at, subset="train")
                    tracker.track("top1", acc, step=at, subset="train")
                    for key, value in info.items():
                        if isinstance(value, (int, float)):
                            tracker.track(key, value, step=at, subset="train")
                for hook in on_step:
                    hook(at, loss, acc, info)
                in_epoch = _first + i
                stop.check()
                if distributed and all_reduce_sum([1.0 if stop.received else 0.0])[0] > 0:
                    stop.received = stop.received or "SIGTERM"  # another rank got it: stop together
                every = plan.checkpoint_every
                if stop.received or (every and at % every == 0 and in_epoch < steps_per_epoch):
                    path = save_last(_epoch, in_epoch, _meta)
                    if stop.received:
                        raise Interrupted(stop.received, path, at)

            stats = train_steps(model, train_loader, step, plan.device, total_steps - out.steps, after_step,
                                desc=f"epoch {epoch}/{epochs}")
            out.steps = base + int(stats["steps"])
            last_epoch = epoch == epochs or out.steps >= total_steps
            entry: dict[str, Any] = {"epoch": epoch, "step": out.steps, "train_loss": stats["loss"], "train_top1": stats["top1"]}
            if epoch % plan.val_every == 0 or last_epoch:
                _validate(model, loaders.val, plan, out, epoch, entry, epoch_meta, saver)
            if last_epoch and loaders.test is not None:
                out.final = evaluate(model, loaders.test, plan.device, desc="test")
                plan.tracker.track("top1", out.final["top1"], step=out.steps, subset="test")
                entry.update(test_loss=out.final["loss"], test_top1=out.final["top1"])
            for hook in on_epoch_end:
                hook(epoch, entry)
            out.history.append(entry)
            path = save_last(epoch + 1, 0, epoch_meta)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})
            if stop.received:
                raise Interrupted(stop.received, path, out.steps)
            if out.steps >= total_steps:
                break
    return out


def _validate(model: nn.Module, loader: DataLoader, plan: FitPlan, out: FitResult, epoch: int,
              entry: dict[str, Any], epoch_meta: dict[str, Any], saver: Saver) -> None:
    """Score the model on `loader`, track it, record it in `entry`/`out`, and write `best` if it is."""
    val = evaluate(model, loader, plan.device, desc="validate")
    plan.tracker.track("loss", val["loss"], step=out.steps, subset=plan.val_subset)
    plan.tracker.track("top1", val["top1"], step=out.steps, subset=plan.val_subset)
    entry.update(val_loss=val["loss"], val_top1=val["top1"])
    epoch_meta["metrics"] = {"top1": val["top1"], "loss": val["loss"]}
    out.final = val
    if val["top1"] > out.best["top1"]:
        out.best = {"top1": val["top1"], "epoch": epoch, "step": out.steps}
        saver(plan.checkpoint_dir / "best", {**epoch_meta, "step": out.steps}, None)


def schedule_length(train_loader: DataLoader, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps for `epochs` epochs, capped at `max_steps`."""
    total = int(epochs) * len(train_loader)
    return min(total, int(max_steps)) if max_steps else total
