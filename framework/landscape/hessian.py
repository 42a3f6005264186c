"""The largest eigenvalue of the loss Hessian over the weights, by power iteration on
Hessian-vector products (as PyHessian, Yao et al., IEEE BigData 2020; and HAWQ, Dong et al.,
ICCV 2019, for quantized networks)::

    H v = d/dw <dL/dw, v>                        (Pearlmutter's trick: a double backward)
    v_0 ~ N(0, I) / ||.||,   v_{k+1} = H v_k / ||H v_k||,   lambda_k = <v_k, H v_k>

stopped when `|lambda_k - lambda_{k-1}| / |lambda_k| < tol` or after `max_iters` products. Power
iteration converges to the eigenvalue of largest *magnitude*; near a minimum the Hessian's
negative eigenvalues are small and that is the top eigenvalue, the sharpness the papers report.

The products are taken with `torch.autograd.grad(..., create_graph=True)` and a second
`torch.autograd.grad`, one batch term at a time (memory of one batch's graph). `torch.func` is not
used: the quantizers' autograd functions define no `setup_context`/`vmap`, which its transforms need.

**Quantized layers.** Rounding has zero derivative almost everywhere; the quantizers pass gradients
through it straight (the STE: identity inside the clipping range, zero outside). Their backward
passes are written in differentiable tensor ops, so the double backward sees the same estimator:
with the clipping masks `M`, the product is `H v = M (d^2 L / dq^2) M v` for the quantized tensors
`q`, i.e. the Hessian of the loss at the quantized point, restricted to the weights the quantizer
does not clip. The products run inside :func:`framework.quant.kernels.twice_differentiable`: the
compiled and native kernels cannot be differentiated twice, so the quantizers take their reference
ops there (same values; gradients to float tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.landscape.params import LossTerms, Tensors, dot, evaluation, norm, random_vector
from framework.quant import kernels


@dataclass
class TopEigenvalue:
    """The power iteration's result: the eigenvalue estimate `<v, H v>` of its last iterate, the
    number of Hessian-vector products, the last relative change (None after one product), whether
    that change fell below `tol`, and the estimate after every product."""

    eigenvalue: float
    iterations: int
    rel_change: float | None
    converged: bool
    history: list[float] = field(default_factory=list)


def hessian_vector_product(model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor],
                           vector: Sequence[torch.Tensor]) -> Tensors:
    """`H v`, the Hessian of `L` over `params` times `vector`, summed over the loss's batch terms
    (zeros where a parameter has no second derivative)."""
    params = list(params)
    out = [torch.zeros_like(p) for p in params]
    with evaluation(model), kernels.twice_differentiable():
        for term in loss(model):
            grads = torch.autograd.grad(term, params, create_graph=True, allow_unused=True)
            inner = sum(((g * v).sum() for g, v in zip(grads, vector, strict=True) if g is not None),
                        torch.zeros((), device=term.device))
            if not inner.requires_grad:  # the gradient does not depend on the weights: H = 0
                continue
            for acc, hv in zip(out, torch.autograd.grad(inner, params, allow_unused=True), strict=True):
                if hv is not None:
                    acc.add_(hv.detach())
    return out


class _HeldGradients:
    """`H v` from gradient graphs built once: every batch term's `dL_b/dw` with its graph, held
    across products, so a product costs only the second backward (as PyHessian does for one batch)."""

    def __init__(self, model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor]):
        self.params = list(params)
        with evaluation(model), kernels.twice_differentiable():
            self.grads = [torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
                          for term in loss(model)]

    def __call__(self, vector: Sequence[torch.Tensor]) -> Tensors:
        out = [torch.zeros_like(p) for p in self.params]
        for grads in self.grads:
            inner = sum(((g * v).sum() for g, v in zip(grads, vector, strict=True) if g is not None),
                        torch.zeros((), device=out[0].device))
            if not inner.requires_grad:
                continue
            for acc, hv in zip(out, torch.autograd.grad(inner, self.params, retain_graph=True, allow_unused=True),
                               strict=True):
                if hv is not None:
                    acc.add_(hv)
        return out


def top_hessian_eigenvalue(model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor], max_iters: int = 20,
                           tol: float = 1e-3, seed: int = 0, hold_graphs: bool = False) -> TopEigenvalue:
    """The largest-magnitude eigenvalue of the Hessian of `L` over `params` by power iteration from a
    random unit vector drawn from `seed`, at most `max_iters` Hessian-vector products.

    `hold_graphs=False` rebuilds each batch's gradient graph for every product (the memory of one
    batch's graph); `True` builds every batch's once and holds them all until the iteration ends
    (a product then costs the second backward alone, without the first).
    """
    product = _HeldGradients(model, loss, params) if hold_graphs else (
        lambda vector: hessian_vector_product(model, loss, params, vector))
    v = random_vector(params, seed)
    length = norm(v)
    v = [x / length for x in v]
    history: list[float] = []
    rel_change: float | None = None
    flat = False
    for _ in range(max(1, int(max_iters))):
        hv = product(v)
        estimate = dot(v, hv)
        if history:
            rel_change = abs(estimate - history[-1]) / max(abs(estimate), 1e-12)
        history.append(estimate)
        length = norm(hv)
        if length == 0.0:  # H v = 0 for a random v: H = 0 (almost surely), the eigenvalue is exactly 0
            flat = True
            break
        if not math.isfinite(length):
            break
        v = [x / length for x in hv]
        if rel_change is not None and rel_change < tol:
            break
    converged = flat or (rel_change is not None and rel_change < tol)
    return TopEigenvalue(history[-1], len(history), rel_change, converged, history)
