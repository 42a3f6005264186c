"""The `result.json` contract every stage honours (DESIGN.md, "Run directory").

`{"stage", "status": "ok"|"error", "metrics", "artifacts", "config", ...}` written atomically, so a
reader never sees half a file and a failed run never leaves a file claiming success.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class Result:
    """What a stage returns: small metrics and the paths of the files it wrote."""

    stage: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_to_dict(cfg: DictConfig | dict | None) -> dict[str, Any] | None:
    """The resolved config as plain containers (interpolations that cannot resolve stay as text)."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation only Hydra's runtime can resolve
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


#: what every result.json, checkpoint and tracked run records about the process that computed it
#: (name -> a function giving it), registered by the packages that know it: `kernels` by
#: framework.quant.kernels (the quantizers' backend, its build key and the thread count)
_PROVENANCE: dict[str, Callable[[], Any]] = {}


def record_with_every_result(name: str, describe: Callable[[], Any]) -> None:
    """Add `name: describe()` to every result.json written from now on (and to :func:`provenance`)."""
    _PROVENANCE[name] = describe


def provenance() -> dict[str, Any]:
    """What this process records beside its results (:func:`record_with_every_result`)."""
    return {name: describe() for name, describe in _PROVENANCE.items()}


def write_result(run_dir: str | Path, result: Result, cfg: DictConfig | dict | None = None) -> Path:
    """Write `run_dir/result.json` for `result` and return its path."""
    payload: dict[str, Any] = {
        "stage": result.stage,
        "status": result.status,
        "metrics": result.metrics,
        "artifacts": result.artifacts,
        **result.extra,
        **provenance(),
        "config": config_to_dict(cfg),
    }
    path = Path(run_dir) / "result.json"
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_stopped_result(run_dir: str | Path, stage: str, status: str, message: str, cfg: DictConfig | dict | None,
                         rank: int = 0, **extra: Any) -> None:
    """How a process records a run that ended in an error or an interruption: rank 0 writes
    `result.json` with `status` and `error: message` (plus `extra`); another rank leaves its message
    in `rank<r>.error`, since one result.json speaks for the run."""
    if rank == 0:
        write_result(run_dir, Result(stage, status=status, extra={"error": message, **extra}), cfg)
    else:
        (Path(run_dir) / f"rank{rank}.error").write_text(message + "\n")


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """Read `run_dir/result.json`."""
    return json.loads((Path(run_dir) / "result.json").read_text())


def finished_result(run_dir: str | Path) -> dict[str, Any] | None:
    """`run_dir/result.json` if the stage there finished (status ok), else None (absent, unreadable or not ok)."""
    try:
        result = read_result(run_dir)
    except (OSError, ValueError):
        return None
    return result if result.get("status") == "ok" else None
