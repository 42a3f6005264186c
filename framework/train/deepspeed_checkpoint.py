"""Checkpoints of a DeepSpeed run, written by every rank and committed atomically by rank 0.

The checkpoint directory keeps the single-process layout (`meta.json`, `model.pt`, `training.pt`,
readable by `mpq evaluate` and by `init_checkpoint=`) and adds `deepspeed/`: the engine's own
checkpoint, where each rank writes its ZeRO partition of the optimizer state, plus
`rng-rank<r>.pt` with each rank's RNG states. All ranks assemble it in one staging folder named
after the step; after a barrier, rank 0 writes the portable files and renames the folder into
place, so a killed run leaves the previous checkpoint intact.

It lives in `framework.train` (not `framework.dist`) because it writes the training checkpoint format
of :mod:`framework.train.checkpoint`; `framework.dist` stays below `framework.train` and imports none of it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch

from framework.dist.process_group import all_reduce_sum, barrier
from framework.dist.ranks import Ranks
from framework.errors import MPQError
from framework.train.checkpoint import (
    Checkpoint,
    checkpoint_write_error,
    commit_checkpoint,
    is_write_failure,
    staging_dir,
    write_checkpoint_files,
)

ENGINE_TAG = "deepspeed"


class EngineCheckpointWriter:
    """The `saver` of :func:`framework.train.engine.fit` for a DeepSpeed engine (call on every rank)."""

    def __init__(self, engine, model: torch.nn.Module, ranks: Ranks):
        self.engine, self.model, self.ranks = engine, model, ranks

    def __call__(self, path: Path, meta: dict[str, Any], training_state: dict[str, Any] | None) -> Path:
        path = Path(path)
        tmp = staging_dir(path, f"step{meta.get('step', 0)}")
        if self.ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        failure = None
        if training_state is not None:  # resumable: the engine's partitions and every rank's RNG
            failure = self._attempt(lambda: (
                self.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False),
                torch.save(training_state.get("rng"), tmp / ENGINE_TAG / f"rng-rank{self.ranks.rank}.pt")))
        self._agree(failure, path, tmp)
        if self.ranks.is_main:
            meta = {**meta, "world_size": self.ranks.world_size,
                    "zero_stage": int(self.engine.zero_optimization_stage())}
            failure = self._attempt(lambda: write_checkpoint_files(tmp, self.model, meta, training_state))
        self._agree(failure, path, tmp)
        if self.ranks.is_main:
            commit_checkpoint(tmp, path)
        barrier()
        return path

    @staticmethod
    def _attempt(write) -> BaseException | None:
        """Run one rank's part of the write; a storage failure is returned, anything else raised."""
        try:
            write()
        except Exception as err:
            if not is_write_failure(err):
                raise
            return err
        return None

    def _agree(self, failure: BaseException | None, path: Path, tmp: Path) -> None:
        """A barrier that also tells every rank whether some rank failed to write its part: then all
        of them raise the same one-line error, after rank 0 removed the staging folder (the
        checkpoint at `path` was never touched)."""
        if all_reduce_sum([1.0 if failure is not None else 0.0])[0]:  # also the barrier
            if self.ranks.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_write_error(path, failure if failure is not None else OSError(
                errno.ENOSPC, "another rank could not write its part"))


def restore_engine(engine, checkpoint: Checkpoint, ranks: Ranks) -> dict[str, Any]:
    """Load the engine's state (optimizer partitions, scheduler) from a checkpoint of the same run,
    and return its training state with this rank's RNG states in it."""
    folder = checkpoint.path / ENGINE_TAG
    written_by = int(checkpoint.meta.get("world_size", 1))
    stage = int(engine.zero_optimization_stage())
    if not folder.is_dir():
        raise MPQError(f"checkpoint {checkpoint.path} has no {ENGINE_TAG}/ folder to resume the engine from; "
                       f"start without resume=true")
    if stage > 0 and written_by != ranks.world_size:
        raise MPQError(f"checkpoint {checkpoint.path} holds ZeRO-{stage} optimizer partitions of {written_by} processes; "
                       f"resume with {written_by} processes (dist.nproc={written_by})")
    try:
        load_path, _ = engine.load_checkpoint(str(checkpoint.path), tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as err:  # DeepSpeed raises assorted errors for missing or foreign files
        raise MPQError(f"checkpoint {checkpoint.path} cannot be resumed by DeepSpeed "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if load_path is None:
        raise MPQError(f"checkpoint {checkpoint.path}/{ENGINE_TAG} is incomplete; start without resume=true")
    state = dict(checkpoint.training_state or {})
    own_rng = folder / f"rng-rank{ranks.rank}.pt"
    if own_rng.exists():
        state["rng"] = torch.load(own_rng, weights_only=True)
    return state
