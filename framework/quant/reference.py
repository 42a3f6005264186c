"""The reference implementation of every fake-quantizer operation: eager torch, the specification
that each accelerated backend (:mod:`framework.quant.compiled`, :mod:`framework.quant.native`) is
held to by the tests, forward to the bit and gradients to float tolerance.

Rounding is round-half-to-even (`torch.round`) with the straight-through estimator (Bengio et al.
2013). At the clipping bounds the gradient follows fixed tie rules, which every backend repeats:

- **LSQ** (Esser et al., "Learned Step Size Quantization", ICLR 2020), `v = x / s`::

      q = clamp(round(v), Qn, Qp) * s
      dq/dx = 1[Qn <= v <= Qp]                       (the whole gradient on a bound)
      dq/ds = round(clamp(v, Qn, Qp)) - v * 1[Qn <= v <= Qp]   (Qn below, Qp above, round(v) - v inside)

  the step's gradient summed over the elements sharing the step and scaled by `grad_scale`.
- **Learned range** (PACT, Choi et al. 2018; the EdMIPS/GMPQ search's activation candidates),
  `r = |rho| + 1e-8`, `L` levels, `c = min(relu(x), r)` (unsigned) or `max(min(x, r), -r)` (signed)::

      q = round(c / s) * s,   s = r / L

  with torch's tie rules for min/max (each side half the gradient where `x == r`) and relu's
  gradient 0 at 0.
- **Mixes** (the supernet, EdMIPS/GMPQ composite form): `x_mix = sum_i p_i Q_i(x)` over learned-range
  candidates; `W_mix = sum_j p_j Q_j(W)` over min-max candidates, `s_j = max|W| / Qp_j` (detached).

These functions can be differentiated twice (Hessian-vector products use them).
"""

from __future__ import annotations

import torch

from framework.quant.rounding import round_ste

#: the smallest step or range a learned quantizer is allowed (a floor that keeps it positive)
MIN_STEP = 1e-8


class _LSQFunction(torch.autograd.Function):
    """LSQ's forward and its gradients in one node; `step` broadcasts against `x` (one element, or
    one per output channel shaped `(C, 1, ...)`)."""

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, grad_scale: float):
        v = x / step
        levels = torch.round(v).clamp_(qn, qp)
        ctx.save_for_backward(v, levels)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_shape = qn, qp, grad_scale, step.shape
        return levels * step

    @staticmethod
    def backward(ctx, grad):
        v, levels = ctx.saved_tensors
        inside = ((v >= ctx.qn) & (v <= ctx.qp)).to(grad.dtype)
        grad_x = grad * inside
        # clamp(round(v)) - v * 1[inside] is Qn below the range, Qp above it and round(v) - v inside
        grad_s = (grad * (levels - v * inside)).sum_to_size(ctx.step_shape)
        return grad_x, grad_s * ctx.grad_scale, None, None, None


def lsq(x: torch.Tensor, step: torch.Tensor, qn: float, qp: float, grad_scale: float) -> torch.Tensor:
    """`clamp(round(x / s), Qn, Qp) * s` with LSQ's gradients (module docstring)."""
    return _LSQFunction.apply(x, step, qn, qp, grad_scale)


def mixed_learned_range(x: torch.Tensor, probs: torch.Tensor, ranges: torch.Tensor, levels: tuple[int, ...],
                        signed: bool) -> torch.Tensor:
    """`sum_i probs[i] * Q(x; ranges[i], levels[i])` over learned-range candidates."""
    out = None
    for i, level in enumerate(levels):
        r = ranges[i]
        clipped = torch.maximum(torch.minimum(x, r), -r) if signed else torch.minimum(torch.relu(x), r)
        step = r / level
        term = probs[i] * (round_ste(clipped / step) * step)
        out = term if out is None else out + term
    return out


def ranges_of(rhos: list[torch.Tensor]) -> torch.Tensor:
    """The candidates' ranges `|rho_i| + 1e-8` from their range parameters (scalars)."""
    return torch.stack([rho.reshape(()) for rho in rhos]).abs() + MIN_STEP


class _MixedMinMaxFunction(torch.autograd.Function):
    """`W_mix = sum_j p_j * clamp(round(W / s_j), -Qp_j, Qp_j) * s_j`, `s_j = max|W| / Qp_j` constant
    (detached), round's straight-through gradient: dW_mix/dW = sum_j p_j, dW_mix/dp_j = Q_j(W). The
    candidates are quantized as one (K, N) tensor, the terms added in candidate order, and the
    gradients of all p_j come from one matrix-vector product."""

    @staticmethod
    def forward(ctx, w, probs, qps):
        steps = (w.detach().abs().max() / qps).clamp_min(MIN_STEP)  # (K,)
        shape = (-1, *([1] * w.dim()))
        quantized = torch.round(w.detach().unsqueeze(0) / steps.view(shape))
        quantized = torch.maximum(torch.minimum(quantized, qps.view(shape)), -qps.view(shape)) * steps.view(shape)
        ctx.save_for_backward(quantized, probs)
        out = probs[0].to(w.dtype) * quantized[0]  # added candidate by candidate, in order
        for j in range(1, len(qps)):
            out = out + probs[j].to(w.dtype) * quantized[j]
        return out

    @staticmethod
    def backward(ctx, grad):
        quantized, probs = ctx.saved_tensors
        grad_w = grad * probs.sum().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_p = (quantized.flatten(1) @ grad.flatten()).to(probs.dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_p, None


def mixed_minmax(w: torch.Tensor, probs: torch.Tensor, qps: torch.Tensor) -> torch.Tensor:
    """`sum_j probs[j] * clamp(round(W / s_j), -qps[j], qps[j]) * s_j` over low-bit min-max candidates."""
    return _MixedMinMaxFunction.apply(w, probs, qps.to(w.dtype))
