"""How every stage starts: its run directory, torch threads, seeds and device, and the
sub-configs the pipeline hands to the stages it chains."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from framework.quant import kernels
from framework.train.loop import resolve_device, seed_everything


def run_directory(cfg: DictConfig, stage: str) -> Path:
    """`cfg.run_dir` (Hydra's output directory, set by `mpq`), or a time-stamped folder under
    `outputs/<stage>/` when a stage is called from Python without one; created."""
    path = Path(cfg.run_dir) if cfg.run_dir else Path("outputs") / stage / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_threads(cfg: DictConfig) -> None:
    """`threads`, or, for one of several torchrun processes on this node, an equal share of the
    cores (Slurm tasks are already bound to their own cores)."""
    threads = cfg.threads
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if not threads and local_world > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // local_world)
    if threads:
        torch.set_num_threads(int(threads))


def start_stage(cfg: DictConfig, stage: str) -> tuple[Path, torch.device]:
    """The run directory (created), torch threads, seeds, device and the quantizers' kernel backend
    (`quant.kernels`, framework.quant.kernels) every computing stage starts with."""
    run_dir = run_directory(cfg, stage)
    set_threads(cfg)
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # runs that repeat: cuDNN and cuBLAS pick deterministic algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    kernels.use(str(cfg.quant.get("kernels", "auto")), device)
    return run_dir, device


def sub_config(cfg: DictConfig, run_dir: Path, **updates: Any) -> DictConfig:
    """A copy of `cfg` that runs in `run_dir`, with dotted-key `updates` (new keys allowed)."""
    sub = cfg.copy()
    with open_dict(sub):
        sub.run_dir = str(run_dir)
        for key, value in updates.items():
            OmegaConf.update(sub, key, value, force_add=True)
    return sub
