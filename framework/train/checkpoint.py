"""Checkpoints: one directory per save, written under a temporary name and renamed into place.

Layout of a checkpoint directory::

    meta.json      format, the kernels that computed it (framework.quant.kernels), model (name, classes,
                   channels, options), data geometry, step, epoch, metrics
    model.pt       the model's state dict
    training.pt    optimizer, scheduler and two-pass optimizer states (the training side of the run)
    deepspeed/     stages trained through DeepSpeed: the engine's own checkpoint (every rank's
                   optimizer partition, the scheduler) and each rank's RNG states

A save writes everything into `.<name>.tmp-<pid>` beside the target, then swaps it in with
renames; a reader therefore sees the old checkpoint or the new one, never half of one. Loading
uses `torch.load(..., weights_only=True)`; anything unreadable is an :class:`MPQError` that names
the path and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.errors import MPQError
from framework.results import provenance

FORMAT = "mpq-checkpoint/1"


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any] | None = field(default=None)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory at `path` (replacing any previous one)."""
    path = Path(path)
    tmp = staging_dir(path, str(os.getpid()))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_checkpoint_files(tmp, model, meta, training_state)
    except Exception as err:
        if not is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_write_error(path, err) from None
    return commit_checkpoint(tmp, path)


def is_write_failure(err: BaseException) -> bool:
    """An error of the storage under a checkpoint being written: an OSError (no space, quota, I/O)
    or the RuntimeError torch.save raises when its stream writer cannot write."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("PytorchStreamWriter", "file write failed", "No space left", "unexpected pos"))


def checkpoint_write_error(path: Path, err: BaseException) -> MPQError:
    """The one-line error of a checkpoint that could not be written; the staging folder is gone and
    the checkpoint that was at `path` before (if any) is untouched: the write never reached the rename."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    previous = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    # torch's writer often says only "unexpected pos"/"file write failed": the free space tells
    full = ((isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(err)
            or (free is not None and free < max(previous, 1 << 20)))
    room = f" ({free // 1024} KiB free)" if free is not None else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    reason = f"the disk is full{room}" if full else f"{type(err).__name__}: {first}{room}"
    kept = (f"the previous checkpoint there (step {_step_of(path)}) is intact" if (path / "meta.json").exists()
            else "nothing was there before")
    return MPQError(f"cannot write checkpoint {path}: {reason}; {kept}; free space under {path.parent} and run the "
                    f"same command with resume=true to continue")


def _step_of(path: Path) -> str:
    try:
        return str(json.loads((path / "meta.json").read_text()).get("step", "?"))
    except (OSError, ValueError):
        return "?"


def staging_dir(path: Path, token: str) -> Path:
    """Where a checkpoint for `path` is assembled before :func:`commit_checkpoint` renames it."""
    return path.parent / f".{path.name}.tmp-{token}"


def write_checkpoint_files(tmp: Path, model: nn.Module, meta: dict[str, Any], training_state: dict[str, Any] | None) -> None:
    meta = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(), **provenance(), **meta}
    torch.save(model.state_dict(), tmp / "model.pt")
    if training_state is not None:
        torch.save(training_state, tmp / "training.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def commit_checkpoint(tmp: Path, path: Path) -> Path:
    """Swap the assembled `tmp` in at `path` with renames: readers see the old or the new one."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory holding `checkpoints/last`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MPQError(f"checkpoint {path} does not exist; pass the checkpoint directory a run wrote (…/checkpoints/last)")
    if (path / "meta.json").exists() or (path / "model.pt").exists():
        return path
    for candidate in (path / "checkpoints" / "last", path / "last"):
        if (candidate / "meta.json").exists():
            return candidate
    raise MPQError(f"{path} is not a checkpoint: it holds no meta.json (a checkpoint directory has meta.json and model.pt)")


def load_checkpoint(path: str | Path, with_training_state: bool = False) -> Checkpoint:
    """Read a checkpoint directory; corrupt or foreign files are one clear error."""
    path = resolve_checkpoint_path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise MPQError(f"checkpoint {path} is corrupt: meta.json is unreadable ({type(err).__name__}); re-run the stage that wrote it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise MPQError(f"checkpoint {path} is not an {FORMAT} checkpoint (meta.json lacks format/model)")
    try:
        model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise MPQError(
            f"checkpoint {path} is corrupt: model.pt cannot be read ({type(err).__name__}); "
            f"re-run the stage that wrote it or use another checkpoint"
        ) from None
    if not isinstance(model_state, dict):
        raise MPQError(f"checkpoint {path} is corrupt: model.pt does not hold a state dict")
    training_state = None
    if with_training_state and (path / "training.pt").exists():
        try:
            training_state = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            raise MPQError(f"checkpoint {path} is corrupt: training.pt cannot be read ({type(err).__name__})") from None
    return Checkpoint(path=path, meta=meta, model_state=model_state, training_state=training_state)


def load_model_state(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load the checkpoint's weights into `model`; a mismatch names the differing tensors."""
    result = model.load_state_dict(checkpoint.model_state, strict=False)
    own = model.state_dict()
    wrong_shape = [
        k for k, v in checkpoint.model_state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape
    ]
    if result.missing_keys or result.unexpected_keys or wrong_shape:
        detail = "; ".join(
            f"{label}: {names[:4]}{' ...' if len(names) > 4 else ''}"
            for label, names in (
                ("missing", result.missing_keys),
                ("unexpected", result.unexpected_keys),
                ("wrong shape", wrong_shape),
            )
            if names
        )
        raise MPQError(f"checkpoint {checkpoint.path} does not match the model ({detail})")
