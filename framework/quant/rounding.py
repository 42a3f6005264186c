"""Rounding with the straight-through estimator (STE), which every quantizer and fused kernel uses."""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator, Bengio et al. 2013)."""
    return x + (torch.round(x) - x).detach()
