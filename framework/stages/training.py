"""The body pretrain and finetune share: a process group, resume, tracking, DeepSpeed training on
the target data (:func:`framework.train.data_parallel.train_on_target`) and the result."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from framework.dist.launch import lost_peer_message
from framework.dist.process_group import lost_peer_reason, open_process_group
from framework.errors import MPQError
from framework.results import Result
from framework.stage import distribution_record, finish_stage
from framework.track import open_tracker
from framework.train.data_parallel import train_on_target
from framework.train.resume import resume_checkpoint, resume_record

log = logging.getLogger(__name__)


@dataclass
class TrainingJob:
    """What differs between the training stages: the model (on its device, quantized or not), the
    data, the config node with the schedule (`cfg.train` or `cfg.finetune`), the checkpoint meta,
    the sharpness rule, and what to do on every rank before the first step (`on_start(ranks,
    tracker) -> artifacts`)."""

    stage: str
    model: nn.Module
    train_set: Any
    test_set: Any
    data_cfg: DictConfig
    train_cfg: DictConfig
    batch_key: str
    meta: dict[str, Any]
    description: str
    sharpness: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    on_start: Callable[[Any, Any], dict[str, str]] | None = None
    val_set: Any = None  # the held-out validation part (data.val_fraction); None: validate on test_set


def run_training_stage(cfg: DictConfig, job: TrainingJob, run_dir: Path, device: torch.device) -> Result:
    """Train `job.model` for `job.train_cfg.epochs` epochs on every rank; rank 0 writes the result.

    `metrics`: top-1 and loss of the final model on the test split, the best validation top-1 (on
    `job.val_set` when there is one, else the test split) and its epoch, steps, epochs, sample counts, the global batch and seconds, plus `job.metrics`.
    `artifacts`: `checkpoint` (`checkpoints/last`) and `best_checkpoint`, plus `on_start`'s.
    """
    with open_process_group(device, cfg.dist.backend, cfg.dist.timeout_min) as ranks:
        log.info("%s, device %s, rank %d of %d", job.description, device, ranks.rank, ranks.world_size)
        resume = resume_checkpoint(cfg, run_dir, warn=ranks.is_main)
        tracker = open_tracker(cfg, job.stage, main=ranks.is_main)
        started = time.time()
        try:
            artifacts = job.on_start(ranks, tracker) if job.on_start is not None else {}
            trained = train_on_target(cfg, model=job.model, train_set=job.train_set, test_set=job.test_set,
                                      data_cfg=job.data_cfg, train_cfg=job.train_cfg, batch_key=job.batch_key,
                                      meta=job.meta, run_dir=run_dir, device=device, ranks=ranks, tracker=tracker,
                                      resume=resume, sharpness=job.sharpness, val_set=job.val_set)
        except RuntimeError as err:
            reason = lost_peer_reason(err) if ranks.distributed else None
            if reason is not None:
                raise lost_peer_error(ranks, run_dir, reason) from None
            raise
        finally:
            tracker.close()
    fitted = trained.fitted
    metrics = {
        "top1": fitted.final["top1"], "loss": fitted.final["loss"],
        "best_top1": fitted.best["top1"], "best_epoch": fitted.best.get("epoch"),
        **job.metrics,
        "steps": fitted.steps, "epochs": len(fitted.history),
        "train_samples": len(job.train_set), "test_samples": len(job.test_set),
        "val_samples": len(job.val_set) if job.val_set is not None else None,
        "global_batch": trained.geometry.global_batch, "seconds": round(time.time() - started, 2),
    }
    ckpt_dir = run_dir / "checkpoints"
    artifacts.update(checkpoint=str(ckpt_dir / "last"), best_checkpoint=str(ckpt_dir / "best"))
    result = Result(job.stage, metrics=metrics, artifacts=artifacts,
                    extra={"history": fitted.history, "data": job.train_set.mpq_info, "tracking": tracker.info(),
                           "resume": resume_record(cfg, run_dir, resume), **distribution_record(trained.geometry, cfg)})
    return finish_stage(run_dir, result, cfg, main=ranks.is_main)


class LostPeer(MPQError):
    """A collective failed because another process of the run died: a crash of the run, not a
    mistake of the user, so a launcher that restarts its workers (`launcher=ray`) restarts them."""


def lost_peer_error(ranks, run_dir: Path, reason: str) -> LostPeer:
    """The one-line error of a rank whose peer died mid-run (killed, out of memory, its node gone):
    the collective it waited in failed; the last checkpoint is whatever was committed before."""
    return LostPeer(lost_peer_message(ranks.world_size, f"rank {ranks.rank} saw \"{reason}\" in a collective", run_dir))
