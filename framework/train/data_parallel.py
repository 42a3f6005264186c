"""Training on the target data through DeepSpeed: what `pretrain` and `finetune` share.

`train_on_target` shards the data over the ranks (:mod:`framework.data.loaders`), builds the
torch optimizer and schedule for the global batch, wraps the model in a DeepSpeed engine
(:mod:`framework.dist.engine`), takes each step through :class:`EngineTwoPass` (plain steps when
there is no sharpness rule), and runs the shared epoch loop with checkpoints every rank writes
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
from framework.sharpness import EngineTwoPass, build_rule
from framework.train.checkpoint import Checkpoint, load_model_state
from framework.train.deepspeed_checkpoint import EngineCheckpointWriter, restore_engine
from framework.train.engine import FitResult, fit, schedule_length
from framework.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class TargetTraining:
    fitted: FitResult
    geometry: BatchGeometry
    total_steps: int


def _rule(sharpness: Any):
    if sharpness is None or str(sharpness.get("name", "none")) == "none":
        return None, None, 1
    saq_case = int(sharpness.get("saq_case", 3)) if str(sharpness.get("name")) == "saq" else None
    try:
        return build_rule(sharpness), saq_case, int(sharpness.get("period", 1) or 1)
    except ValueError as err:
        raise MPQError(f"finetune.sharpness: {err}") from None


def _step_function(engine, two_pass: EngineTwoPass, geometry: BatchGeometry):
    """(images, labels) of one rank's optimizer step -> its `accumulation` micro-steps."""
    criterion = nn.CrossEntropyLoss()
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None

    def step(images: torch.Tensor, labels: torch.Tensor):
        losses, outputs, info = [], [], {}
        for x, y in zip(images.split(geometry.micro_batch), labels.split(geometry.micro_batch), strict=True):
            x = x.to(dtype) if dtype is not None else x
            kept: list[torch.Tensor] = []

            def forward(net, x=x, y=y, kept=kept):
                out = net(x)
                if not kept:
                    kept.append(out.detach().float())
                return criterion(out.float(), y)

            info = two_pass.micro_step(forward)
            losses.append(info["loss"])
            outputs.append(kept[0])
        info = {k: v for k, v in info.items() if k != "loss"}
        return torch.tensor(sum(losses) / len(losses)), torch.cat(outputs), info

    return step


def train_on_target(
    cfg: DictConfig, *, model: nn.Module, train_set, test_set, data_cfg: Any, train_cfg: Any, batch_key: str,
    meta: dict[str, Any], run_dir: Path, device: torch.device, ranks: Ranks, tracker, resume: Checkpoint | None,
    sharpness: Any = None,
) -> TargetTraining:
    """Train `model` (already on `device`, quantized or not) for `train_cfg.epochs` epochs.

    `train_cfg` holds `batch_size` (the global batch), `epochs`, `max_steps`, `optim`, `val_every`.
    `resume` is this run's `checkpoints/last` when resuming. Checkpoints go to `run_dir/checkpoints`.
    """
    geometry = batch_geometry(int(train_cfg.batch_size), cfg.dist, ranks.world_size, batch_key)
    train_loader = build_loader(train_set, geometry.micro_batch, True, data_cfg, seed=int(cfg.seed),
                                accumulation=geometry.accumulation, rank=ranks.rank, world_size=ranks.world_size)
    test_loader = build_loader(test_set, cfg.train.eval_batch_size, False, data_cfg, rank=ranks.rank,
                               world_size=ranks.world_size)
    if len(train_loader) == 0:
        raise MPQError(f"the training set has {len(train_set)} samples, fewer than one global batch of "
                       f"{geometry.global_batch}; raise data.fraction or lower {batch_key}")
    total_steps = schedule_length(train_loader, int(train_cfg.epochs), train_cfg.get("max_steps"))
    rule, saq_case, period = _rule(sharpness)
    if resume is not None:
        load_model_state(model, resume)
    optimizer = build_optimizer(model, train_cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, train_cfg.optim)
    engine = build_engine(model, optimizer, scheduler, geometry, cfg.dist, device, two_pass=rule is not None)
    try:
        two_pass = EngineTwoPass(engine, model, rule, period=period, saq_case=saq_case)
    except ValueError as err:
        raise MPQError(f"finetune.sharpness: {err}") from None
    state = None
    if resume is not None:
        state = restore_engine(engine, resume, ranks)
        if "two_pass" in state:
            two_pass.load_state_dict(state["two_pass"])
    log.info("%d steps of global batch %d (micro-batch %d x accumulation %d x %d process(es)), ZeRO %d",
             total_steps, geometry.global_batch, geometry.micro_batch, geometry.accumulation, ranks.world_size,
             int(cfg.dist.get("zero_stage", 0)))

    def on_step(step: int, loss: float, acc: float, info: dict) -> None:
        if step % 10 == 0:
            tracker.track("lr", optimizer.param_groups[0]["lr"], step=step, subset="train")

    fitted = fit(
        model, train_loader, test_loader, _step_function(engine, two_pass, geometry), device, total_steps, tracker,
        run_dir / "checkpoints", {**meta, "world_size": ranks.world_size}, val_every=int(train_cfg.get("val_every", 1)),
        checkpoint_every=int(cfg.get("checkpoint_every") or 0), resume=state,
        training_state=lambda: {"two_pass": two_pass.state_dict()}, on_step=on_step,
        saver=EngineCheckpointWriter(engine, model, ranks),
    )
    return TargetTraining(fitted, geometry, total_steps)
