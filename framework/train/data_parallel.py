"""Training on the target data through DeepSpeed: what `pretrain` and `finetune` share.

`train_on_target` shards the data over the ranks (:mod:`framework.data.loaders`), builds the
torch optimizer and schedule for the global batch, wraps the model in a DeepSpeed engine
(:mod:`framework.dist.engine`), takes each step through :class:`~framework.train.step.TargetStep`
(the two passes of the sharpness rule; plain steps without one), and runs the shared epoch loop
(:func:`framework.train.engine.fit`) with checkpoints every rank writes
(:mod:`framework.train.deepspeed_checkpoint`). One process is the world-size-1 case of the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from framework.data import build_loader
from framework.dist.engine import BatchGeometry, batch_geometry, build_engine
from framework.dist.ranks import Ranks
from framework.errors import MPQError
from framework.sharpness import build_rule
from framework.train.checkpoint import Checkpoint, load_model_state
from framework.train.deepspeed_checkpoint import EngineCheckpointWriter, restore_engine
from framework.train.engine import FitPlan, FitResult, Hook, Loaders, fit, schedule_length
from framework.train.optim import build_optimizer, build_scheduler
from framework.train.step import TargetStep

log = logging.getLogger(__name__)


@dataclass
class TargetTraining:
    fitted: FitResult
    geometry: BatchGeometry
    total_steps: int


def _rule(sharpness: Any):
    """(rule or None, SAQ case or None, period) of a `finetune.sharpness` node (None: pretrain)."""
    if sharpness is None or str(sharpness.name) == "none":
        return None, None, 1
    saq_case = int(sharpness.saq_case) if str(sharpness.name) == "saq" else None
    try:
        return build_rule(sharpness), saq_case, int(sharpness.period or 1)
    except ValueError as err:
        raise MPQError(f"finetune.sharpness: {err}") from None


class TrackLearningRate(Hook):
    """Tracks the learning rate of the optimizer's first group every `every` steps (train context)."""

    def __init__(self, tracker, optimizer: torch.optim.Optimizer, every: int = 10):
        self.tracker, self.optimizer, self.every = tracker, optimizer, every

    def on_step(self, step: int, loss: float, top1: float, info: dict) -> None:
        if step % self.every == 0:
            self.tracker.track("lr", self.optimizer.param_groups[0]["lr"], step=step, subset="train")


def train_on_target(
    cfg: DictConfig, *, model: nn.Module, train_set, test_set, data_cfg: Any, train_cfg: Any, batch_key: str,
    meta: dict[str, Any], run_dir: Path, device: torch.device, ranks: Ranks, tracker, resume: Checkpoint | None,
    sharpness: Any = None, val_set=None,
) -> TargetTraining:
    """Train `model` (already on `device`, quantized or not) for `train_cfg.epochs` epochs.

    `train_cfg` holds `batch_size` (the global batch), `epochs`, `max_steps`, `optim`, `val_every`.
    `resume` is this run's `checkpoints/last` when resuming. Checkpoints go to `run_dir/checkpoints`.
    `val_set` (the held-out part of the training split, `data.val_fraction`) is what validation and
    the `best` checkpoint read, `test_set` then scored once at the end; without it, `test_set` is both.
    """
    geometry = batch_geometry(int(train_cfg.batch_size), cfg.dist, ranks.world_size, batch_key)
    train_loader = build_loader(train_set, geometry.micro_batch, True, data_cfg, seed=int(cfg.seed),
                                accumulation=geometry.accumulation, rank=ranks.rank, world_size=ranks.world_size)
    test_loader = build_loader(test_set, cfg.train.eval_batch_size, False, data_cfg, rank=ranks.rank,
                               world_size=ranks.world_size)
    val_loader = None if val_set is None else build_loader(val_set, cfg.train.eval_batch_size, False, data_cfg,
                                                           rank=ranks.rank, world_size=ranks.world_size)
    if len(train_loader) == 0:
        raise MPQError(f"the training set has {len(train_set)} samples, fewer than one global batch of "
                       f"{geometry.global_batch}; raise data.fraction or lower {batch_key}")
    total_steps = schedule_length(train_loader, int(train_cfg.epochs), train_cfg.max_steps)
    rule, saq_case, period = _rule(sharpness)
    if resume is not None:
        load_model_state(model, resume)
    optimizer = build_optimizer(model, train_cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, train_cfg.optim)
    engine = build_engine(model, optimizer, scheduler, geometry, cfg.dist, device, two_pass=rule is not None)
    try:
        step = TargetStep(engine, model, rule, geometry.micro_batch, period=period, saq_case=saq_case)
    except ValueError as err:
        raise MPQError(f"finetune.sharpness: {err}") from None
    state = None
    if resume is not None:
        state = restore_engine(engine, resume, ranks)
        step.load_state_dict(state)
    log.info("%d steps of global batch %d (micro-batch %d x accumulation %d x %d process(es)), ZeRO %d",
             total_steps, geometry.global_batch, geometry.micro_batch, geometry.accumulation, ranks.world_size,
             int(cfg.dist.zero_stage))
    plan = FitPlan(total_steps, device, run_dir / "checkpoints", {**meta, "world_size": ranks.world_size},
                   tracker=tracker, val_every=int(train_cfg.val_every), checkpoint_every=int(cfg.checkpoint_every or 0),
                   saver=EngineCheckpointWriter(engine, model, ranks))
    loaders = Loaders(train_loader, test_loader) if val_loader is None else Loaders(train_loader, val_loader, test_loader)
    fitted = fit(model, loaders, step, plan, hooks=[TrackLearningRate(tracker, optimizer)],
                 resume=state)
    return TargetTraining(fitted, geometry, total_steps)
