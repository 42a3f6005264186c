"""Checks of the composed config that Hydra cannot make: types and ranges of the values users set.

Each problem is one :class:`MPQError` naming the key, the value and what would be valid, raised
before any data is read, so a typo costs a second, not a run.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.errors import MPQError


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _int(cfg: DictConfig, key: str, minimum: int = 0, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MPQError(f"{key}={value!r} is invalid: expected a whole number >= {minimum}")


def _fraction(cfg: DictConfig, key: str, optional: bool = True) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise MPQError(f"{key}={value!r} is invalid: expected a fraction in (0, 1]")


def _positive(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) < 0:
        raise MPQError(f"{key}={value!r} is invalid: expected a number >= 0")


def _one_of(cfg: DictConfig, key: str, allowed: tuple, optional: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and optional:
        return
    if value not in allowed:
        raise MPQError(f"{key}={value!r} is invalid: choose one of {', '.join(map(str, allowed))}")


def _bits_list(cfg: DictConfig, key: str) -> None:
    from framework.quant.quantizers import SUPPORTED_BITS

    value = _get(cfg, key)
    values = list(value) if value is not None and not isinstance(value, (str, int)) else None
    if not values or any(isinstance(b, bool) or b not in SUPPORTED_BITS for b in values):
        raise MPQError(f"{key}={value!r} is invalid: expected a list of bit-widths from {list(SUPPORTED_BITS)}")


def _quant(cfg: DictConfig, node: str) -> None:
    if _get(cfg, node) is None:
        return
    from framework.quant.quantizers import ACT_QUANTIZERS, SUPPORTED_BITS, WEIGHT_QUANTIZERS

    _one_of(cfg, f"{node}.weight", WEIGHT_QUANTIZERS)
    _one_of(cfg, f"{node}.activation", ACT_QUANTIZERS)
    fixed = _get(cfg, f"{node}.fixed_bits")
    if fixed is not None and fixed != "searched" and fixed not in SUPPORTED_BITS:
        raise MPQError(f"{node}.fixed_bits={fixed!r} is invalid: expected 8, 32 (or another supported bit-width) or null")
    _bits_list(cfg, f"{node}.candidates_w")
    _bits_list(cfg, f"{node}.candidates_a")


def check_config(cfg: DictConfig) -> None:
    """Raise an :class:`MPQError` for the first invalid value users commonly set."""
    _int(cfg, "seed")
    _int(cfg, "train.epochs", 1)
    _int(cfg, "train.max_steps", 1, optional=True)
    _int(cfg, "train.batch_size", 1)
    _int(cfg, "train.eval_batch_size", 1)
    _int(cfg, "train.val_every", 1)
    _int(cfg, "threads", 1, optional=True)
    _int(cfg, "dist.nproc", 1)
    _int(cfg, "dist.gradient_accumulation", 1)
    _int(cfg, "dist.micro_batch", 1, optional=True)
    _one_of(cfg, "dist.zero_stage", (0, 1, 2, 3))
    _one_of(cfg, "dist.precision", ("auto", "fp32", "bf16", "fp16"))
    _one_of(cfg, "dist.backend", ("auto", "gloo", "nccl"))
    nproc, stage = _get(cfg, "dist.nproc"), _get(cfg, "stage")
    if isinstance(nproc, int) and nproc > 1 and stage not in ("pretrain", "finetune"):
        raise MPQError(f"dist.nproc={nproc} applies to pretrain and finetune; {stage} runs on one process "
                       f"(parallel searches: slurm/search_array.sbatch); drop dist.nproc")
    if _get(cfg, "dist.zero_stage") == 3 and _get(cfg, "stage") in ("pretrain", "finetune", "pipeline"):
        from framework.dist.engine import check_zero_stage

        sharpness = _get(cfg, "finetune.sharpness.name")
        check_zero_stage(3, two_pass=_get(cfg, "stage") != "pretrain" and sharpness not in (None, "none"))
    _int(cfg, "checkpoint_every", 0)
    _positive(cfg, "train.optim.lr")
    _positive(cfg, "train.optim.weight_decay")
    _quant(cfg, "quant")
    if _get(cfg, "search") is not None:
        _int(cfg, "search.epochs", 1)
        _int(cfg, "search.max_steps", 1, optional=True)
        _int(cfg, "search.batch_size", 1, optional=True)
        _positive(cfg, "search.lr_weights")
        _positive(cfg, "search.lr_logits")
        _positive(cfg, "search.complexity.weight")
        _positive(cfg, "search.margin.weight")
        _one_of(cfg, "search.complexity.penalty", ("linear", "hinge"))
        _one_of(cfg, "search.sharpness.name", ("none", "sam", "asam", "asga"))
        _int(cfg, "search.sharpness.period", 1, optional=True)
        _int(cfg, "search.budget_uniform_bits", 1, optional=True)
        budget = _get(cfg, "search.budget_bitops")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise MPQError(f"search.budget_bitops={budget!r} is invalid: expected a positive number of BitOps, or null")
        _quant(cfg, "search.quant")
    if _get(cfg, "finetune") is not None:
        _int(cfg, "finetune.epochs", 1)
        _int(cfg, "finetune.max_steps", 1, optional=True)
        _int(cfg, "finetune.batch_size", 1)
        _positive(cfg, "finetune.optim.lr")
        _one_of(cfg, "finetune.sharpness.name", ("none", "sam", "asam", "asga", "saq"))
        _one_of(cfg, "finetune.sharpness.saq_case", (1, 2, 3), optional=True)
        _int(cfg, "finetune.sharpness.period", 1, optional=True)

    from framework.data.beton import ORDERS, WRITE_MODES  # (no FFCV import)

    for node in ("data", "proxy"):
        _fraction(cfg, f"{node}.fraction")
        _fraction(cfg, f"{node}.test_fraction")
        _int(cfg, f"{node}.per_class", 1, optional=True)
        _int(cfg, f"{node}.channels", 1)
        _int(cfg, f"{node}.num_workers", 0)
        _int(cfg, f"{node}.input_size", 1, optional=True)
        _one_of(cfg, f"{node}.loader", ("torch", "ffcv"), optional=True)
        _one_of(cfg, f"{node}.ffcv.order", ORDERS, optional=True)
        _one_of(cfg, f"{node}.ffcv.write.mode", WRITE_MODES, optional=True)
        _int(cfg, f"{node}.ffcv.write.jpeg_quality", 1, optional=True)
        _int(cfg, f"{node}.ffcv.batches_ahead", 1, optional=True)
        _int(cfg, f"{node}.ffcv.write.max_resolution", 1, optional=True)
        _int(cfg, f"{node}.ffcv.write.workers", 1, optional=True)
        if _get(cfg, f"{node}.channels") not in (1, 3):
            raise MPQError(f"{node}.channels={_get(cfg, f'{node}.channels')!r} is invalid: expected 1 or 3")
