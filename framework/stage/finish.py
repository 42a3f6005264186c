"""How every stage ends: its `result.json` (rank zero only) and what it records of distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.results import Result, write_result


def finish_stage(run_dir: Path, result: Result, cfg: DictConfig, main: bool = True) -> Result:
    """Write `result.json` into the run directory (on the main rank) and return the result."""
    if main:
        write_result(run_dir, result, cfg)
    return result


def distribution_record(geometry, cfg: DictConfig) -> dict[str, Any]:
    """What result.json records of how a training run was distributed (DESIGN: `world_size`)."""
    return {"world_size": geometry.world_size, "distributed": {
        "world_size": geometry.world_size, "micro_batch": geometry.micro_batch,
        "gradient_accumulation": geometry.accumulation, "global_batch": geometry.global_batch,
        "zero_stage": int(cfg.dist.zero_stage), "engine": "deepspeed"}}
