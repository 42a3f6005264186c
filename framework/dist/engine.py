"""The DeepSpeed engine `pretrain` and `finetune` train through.

Batch geometry (DeepSpeed's rule)::

    global batch = micro-batch x gradient accumulation x world size

`train.batch_size` (pretrain) or `finetune.batch_size` is the global batch, so a run gives the same
optimisation on 1 process or on N; `dist.micro_batch`, when set, must agree with it. Each rank
feeds `accumulation` micro-batches of `micro_batch` samples per optimizer step.

The optimizer is the torch optimizer of :mod:`framework.train.optim`, handed to
`deepspeed.initialize`: DeepSpeed's fused optimizers would compile C++ extensions on the CPU.
ZeRO stages 0 (plain data parallel), 1 (optimizer state partitioned) and 2 (+ gradients
partitioned) are supported; stage 3 partitions the parameters themselves and is refused (see
:func:`check_zero_stage`). Precision: fp32 on the CPU; bf16 (or fp16 where bf16 is missing) on CUDA
with `dist.precision=auto`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from framework.errors import MPQError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def per_rank(self) -> int:
        """Samples one rank consumes per optimizer step."""
        return self.micro_batch * self.accumulation


def batch_geometry(global_batch: int, dist_cfg: Any, world_size: int, batch_key: str = "train.batch_size") -> BatchGeometry:
    """Split the global batch into micro-batches, accumulation steps and ranks; bad splits are errors."""
    accumulation = int(dist_cfg.gradient_accumulation)
    if accumulation < 1:
        raise MPQError(f"dist.gradient_accumulation must be >= 1, not {accumulation}")
    micro = dist_cfg.micro_batch
    if micro:
        micro = int(micro)
        if micro * accumulation * world_size != global_batch:
            raise MPQError(
                f"dist.micro_batch={micro} x dist.gradient_accumulation={accumulation} x {world_size} process(es) = "
                f"{micro * accumulation * world_size}, but {batch_key}={global_batch}; set {batch_key}="
                f"{micro * accumulation * world_size} or drop dist.micro_batch"
            )
    else:
        if global_batch % (accumulation * world_size):
            raise MPQError(
                f"{batch_key}={global_batch} does not split into dist.gradient_accumulation={accumulation} x "
                f"{world_size} process(es); choose a multiple of {accumulation * world_size}"
            )
        micro = global_batch // (accumulation * world_size)
    return BatchGeometry(global_batch, micro, accumulation, world_size)


def resolve_precision(requested: str, device: torch.device) -> str:
    requested = str(requested or "auto").lower()
    if requested not in PRECISIONS:
        raise MPQError(f"unknown dist.precision '{requested}'; choose one of: {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            raise MPQError(f"dist.precision={requested} runs on GPUs; on the CPU use dist.precision=fp32 (or auto)")
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def check_zero_stage(stage: int, two_pass: bool) -> None:
    """ZeRO 0-2 keep full parameters on every rank; stage 3 does not, so it is refused.

    A two-pass step (SAM, ASGA, SAQ) adds a perturbation to every parameter and evaluates the loss
    there, and the quantizers read whole weight tensors: both need the full parameters on each rank.
    """
    if stage not in (0, 1, 2, 3):
        raise MPQError(f"dist.zero_stage must be 0, 1, 2 or 3, not {stage}")
    if stage == 3:
        why = ("the two-pass (sharpness-aware) step perturbs the full parameters on each rank"
               if two_pass else "the quantizers and checkpoints here need the full parameters on each rank")
        raise MPQError(f"dist.zero_stage=3 partitions the parameters, but {why}; use dist.zero_stage=2 "
                       f"(optimizer state and gradients partitioned) or lower")


def deepspeed_config(geometry: BatchGeometry, dist_cfg: Any, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (`dist.deepspeed` holds raw extra keys, merged last)."""
    precision = resolve_precision(dist_cfg.precision, device)
    config: dict[str, Any] = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.micro_batch,
        "gradient_accumulation_steps": geometry.accumulation,
        "zero_optimization": {"stage": int(dist_cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,  # a torch optimizer, on purpose (no C++ op builds)
        "gradient_clipping": float(dist_cfg.gradient_clipping),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
    }
    extra = dist_cfg.deepspeed
    if extra:
        extra = OmegaConf.to_container(extra, resolve=True) if not isinstance(extra, dict) else extra
        config = _merge(config, extra)
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _quiet_deepspeed() -> None:
    """DeepSpeed's notices about choices made here on purpose (a torch optimizer under ZeRO: "untested
    optimizer"; its op builders probing gcc) say nothing a user can act on; its errors still show."""
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    for name in ("deepspeed", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, geometry: BatchGeometry,
                 dist_cfg: Any, device: torch.device, two_pass: bool = False):
    """`deepspeed.initialize` around `model` with the torch `optimizer` and `scheduler` (stepped by
    the engine once per optimizer step). The process group must already be open."""
    stage = int(dist_cfg.zero_stage)
    check_zero_stage(stage, two_pass)
    config = deepspeed_config(geometry, dist_cfg, device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # chosen, not guessed (DeepSpeed warns when it guesses)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU machines
    import deepspeed

    _quiet_deepspeed()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its op builds to stdout
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=config, dist_init_required=False)
        except (AssertionError, ValueError) as err:
            raise MPQError(f"DeepSpeed refused the configuration {config}: {err}") from None
    if stage == 0 and geometry.world_size == 1:
        engine.enable_backward_allreduce = False  # one process: nothing to average, skip the bucket copies
    log.info("DeepSpeed engine: ZeRO %d, %d x %d x %d = global batch %d, %s", stage, geometry.micro_batch,
             geometry.accumulation, geometry.world_size, geometry.global_batch, resolve_precision(
                 dist_cfg.precision, device))
    return engine
