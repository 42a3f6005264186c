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
    _positive(cfg, "train.optim.lr")
    _positive(cfg, "train.optim.weight_decay")
    for node in ("data", "proxy"):
        _fraction(cfg, f"{node}.fraction")
        _fraction(cfg, f"{node}.test_fraction")
        _int(cfg, f"{node}.per_class", 1, optional=True)
        _int(cfg, f"{node}.channels", 1)
        _int(cfg, f"{node}.num_workers", 0)
        _int(cfg, f"{node}.input_size", 1, optional=True)
        if _get(cfg, f"{node}.channels") not in (1, 3):
            raise MPQError(f"{node}.channels={_get(cfg, f'{node}.channels')!r} is invalid: expected 1 or 3")
