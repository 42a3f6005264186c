"""The surrogate gap at radius rho: how much the loss rises at the worst point of a small ball, to
first order (SAM, Foret et al., ICLR 2021; GSAM, Zhuang et al., ICLR 2022, which names the gap;
ASGA adapts its radius to it)::

    eps = rho * g / ||g||,   g = dL/dw
    h   = L(w + eps) - L(w)  ~  rho ||g|| + (rho^2 / 2) <g, H g> / ||g||^2

On a quadratic `L = w^T A w / 2` the gap is exactly `rho ||g|| + (rho^2 / 2) g^T A g / ||g||^2`
with `g = A w`. For a quantized model the perturbation moves the latent (full-precision) weights,
before quantization, where training moves them. The weights are restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from framework.landscape.params import LossTerms, gradient, loss_value, norm, restored


@dataclass
class SurrogateGap:
    """`gap = perturbed_loss - loss` at radius `rho`, with `grad_norm = ||g||`."""

    loss: float
    perturbed_loss: float
    gap: float
    grad_norm: float
    rho: float


def surrogate_gap(model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor], rho: float = 0.05) -> SurrogateGap:
    """`L(w + rho g / ||g||) - L(w)` over `params` (0 where the gradient is 0: nothing to climb)."""
    params = list(params)
    value, grads = gradient(model, loss, params)
    length = norm(grads)
    if length == 0.0 or rho == 0:
        return SurrogateGap(value, value, 0.0, length, float(rho))
    with restored(params), torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=float(rho) / length)
        perturbed = loss_value(model, loss)
    return SurrogateGap(value, perturbed, perturbed - value, length, float(rho))
