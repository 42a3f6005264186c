"""Optimizers and the learning-rate schedule.

SGD (momentum, optional Nesterov) or AdamW; weight decay applies to weights of rank >= 2 only (not
to biases or batch-norm affine parameters). The schedule is a linear warm-up followed by a cosine
decay to `min_lr_ratio * lr`, stepped once per optimizer step:

    lr(t) = lr * t / W                                              for t < W
    lr(t) = lr * (m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2)  for W <= t <= T
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from framework.errors import MPQError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
    name = str(optim_cfg.name).lower()
    groups = parameter_groups(model, float(optim_cfg.weight_decay))
    lr = float(optim_cfg.lr)
    if name == "sgd":
        # foreach: multi-tensor updates on the CPU too (torch picks them by itself on CUDA only), the
        # same floats with one op per group instead of one per tensor (quantized models have many small ones)
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(optim_cfg.momentum), nesterov=bool(optim_cfg.nesterov), foreach=True
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), foreach=True)
    raise MPQError(f"unknown optimizer '{optim_cfg.name}'; choose train.optim.name=sgd or adamw")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (see the module docstring)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim_cfg: Any):
    warmup = int(round(float(optim_cfg.warmup_fraction) * total_steps))
    min_ratio = float(optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup, min_ratio)
    )
