"""Stopping and resuming a training run exactly where it was.

- :class:`StopSignals` turns SIGTERM (sent by `scancel`, a time limit, a preemption) and SIGUSR1
  (Slurm's warning signal, `--signal=USR1@<seconds>`) into a flag the training loop checks after
  each step; the loop then saves `checkpoints/last` and raises :class:`Interrupted`.
- :func:`rng_state` / :func:`set_rng_state` capture the Python, NumPy and torch generators, so the
  augmentations after a resume are the ones the interrupted run would have drawn.
- :func:`resume_checkpoint` finds the checkpoint a run directory can resume from (`resume=true`).

Together with the epoch-seeded sampler (framework.data.loaders.EpochSampler), a resumed run
continues at the same step with the same data order and ends with the same weights.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framework.errors import MPQError
from framework.train.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

HANDLED = ("SIGTERM", "SIGUSR1")


class Interrupted(MPQError):
    """The run stopped on a signal after writing a checkpoint it can resume from."""

    def __init__(self, signal_name: str, checkpoint: Path, step: int):
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved at {checkpoint}; "
            f"run the same command with resume=true (and the same hydra.run.dir) to continue"
        )
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step


#: a file whose appearance asks a run to stop like SIGTERM does: `launcher=ray` sets it in its
#: workers, whose training runs outside the main thread and so cannot receive signals
STOP_FILE_ENV = "MPQ_STOP_FILE"


class StopSignals:
    """Context manager: record SIGTERM/SIGUSR1 instead of dying (main thread only), or the
    appearance of the file `$MPQ_STOP_FILE` (:meth:`check`, called after each step)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._stop_file = os.environ.get(STOP_FILE_ENV) or None

    def check(self) -> str | None:
        """What asked the run to stop so far (a signal's name, or `stop request`), else None."""
        if self.received is None and self._stop_file and os.path.exists(self._stop_file):
            self.received = "stop request"
        return self.received

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in HANDLED:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, in types `torch.load(weights_only=True)` reads back."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_checkpoint(cfg, run_dir: Path, warn: bool = True) -> Checkpoint | None:
    """With `resume=true`, the run directory's `checkpoints/last` if it holds a training state.

    When it holds none (a new run directory, or Hydra's time-stamped default, where a resume can
    never find anything) the run starts from step 0 and says so in one warning line (`warn`: on
    the main rank only); :func:`resume_record` puts the same into result.json."""
    if not cfg.resume:
        return None
    last = Path(run_dir) / "checkpoints" / "last"
    if not (last / "training.pt").exists():
        if warn:
            log.warning(no_checkpoint_message(last))
        return None
    ckpt = load_checkpoint(last, with_training_state=True)
    if not ckpt.training_state or "position" not in ckpt.training_state:
        raise MPQError(f"checkpoint {last} cannot be resumed from (no training position); start without resume=true")
    return ckpt


def no_checkpoint_message(last: Path) -> str:
    return (f"resume=true, but {last} holds no checkpoint to resume from: starting from scratch (step 0); "
            f"to continue a run, pass the hydra.run.dir it wrote to")


def resume_record(cfg, run_dir: Path, resume: Checkpoint | None) -> dict[str, Any]:
    """What result.json says about resuming: `requested` (resume=true), `from` (the checkpoint, or
    None when the run started from scratch), `step` (where it continued) and `warning`."""
    if not cfg.resume:
        return {"requested": False}
    if resume is None:
        return {"requested": True, "from": None, "step": 0,
                "warning": no_checkpoint_message(Path(run_dir) / "checkpoints" / "last")}
    position = (resume.training_state or {}).get("position", {})
    return {"requested": True, "from": str(resume.path), "step": int(position.get("step", 0))}
