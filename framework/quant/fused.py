"""Fused quantization kernels: the searchable layer's mixed activation, and LSQ.

    x_mix = sum_i p_i * Q_i(x),   Q_i(x) = round(clamp(x, lo, r_i) / s_i) * s_i,   s_i = r_i / L_i

(learned-range candidates, `lo = 0` or `-r_i` for signed inputs, round with the straight-through
estimator). Written as plain tensor code, it costs about 8 passes over the activation per
candidate and as many again backward, which dominates a supernet step on a CPU
(benchmarks/quant_overhead.py --profile). `torch.compile` turns the whole sum and its gradients
(w.r.t. x, the probabilities p and the ranges r) into one loop each way. The compiled function is
the same math as :class:`LearnedRangeActQuantizer`: the tests compare the two. LSQ gets the same
treatment for fixed-policy layers (one kernel instead of about 13 passes per quantizer).

Which kernel runs: on a CPU, float32 tensors take the C kernels of :mod:`framework.quant.native`
(one pass each way; torch.compile's CPU backward of the mixed activation takes 2-4x as long as
theirs, and each compiled call pays for guards and wrappers); anything else (CUDA, other dtypes,
no C compiler) takes the torch.compile version, compiled once per process and per (candidate
levels, sign) and cached on disk by torch; where that cannot compile either, the eager version,
with a warning. `fused_mixed_learned_range` and `fused_lsq` choose; `compiled_mixed_learned_range`
and `compiled_lsq` are the torch.compile versions alone (the GPU path).
"""

from __future__ import annotations

import logging

import torch

from framework.quant import native
from framework.quant.rounding import round_ste

log = logging.getLogger(__name__)


def mixed_learned_range(
    x: torch.Tensor, probs: torch.Tensor, ranges: torch.Tensor, levels: tuple[int, ...], signed: bool
) -> torch.Tensor:
    """sum_i probs[i] * Q(x; ranges[i], levels[i]) (eager reference implementation)."""
    out = None
    for i, level in enumerate(levels):
        r = ranges[i]
        clipped = torch.maximum(torch.minimum(x, r), -r) if signed else torch.minimum(torch.relu(x), r)
        step = r / level
        term = probs[i] * (round_ste(clipped / step) * step)
        out = term if out is None else out + term
    return out


def lsq_fake_quant(
    x: torch.Tensor, step: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor, grad_scale: torch.Tensor
) -> torch.Tensor:
    """LSQ as plain tensor code: `clamp(round(x / s), Qn, Qp) * s` with the step's gradient scaled
    by `grad_scale` (the same math as :class:`LSQQuantizer`'s autograd function). `step` is already
    shaped to broadcast (per tensor or per output channel); the bounds are tensors so one compiled
    kernel serves every bit-width."""
    scaled = step * grad_scale
    s = step.detach() + (scaled - scaled.detach())  # exactly `step` forward (what an export stores), g backward
    return round_ste(torch.clamp(x / s, qn, qp)) * s


#: compiled variants per function: tensor rank (conv, linear) x grad mode (train, eval) x whether the
#: input needs a gradient (the image does not) x per-tensor/per-channel steps, with room to spare
RECOMPILE_LIMIT = 64


class _Compiled:
    """A function compiled on first use, or its eager self where compilation is not possible."""

    def __init__(self, fn):
        self.fn, self.compiled, self.disabled = fn, None, False

    def __call__(self, *args):
        if not self.disabled:
            try:
                if self.compiled is None:
                    import torch._dynamo as dynamo

                    for name in ("recompile_limit", "cache_size_limit"):
                        if hasattr(dynamo.config, name):
                            setattr(dynamo.config, name, max(getattr(dynamo.config, name), RECOMPILE_LIMIT))
                    self.compiled = torch.compile(self.fn, dynamic=True)
                # parameters are passed as plain tensors (a view), so they share the tensors' kernels
                args = tuple(a.view_as(a) if isinstance(a, torch.nn.Parameter) else a for a in args)
                return self.compiled(*args)
            except Exception as err:  # no compiler, unsupported platform: keep going, slower
                self.disabled = True
                log.warning("fused %s unavailable (%s: %s); using the eager version", self.fn.__name__,
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return self.fn(*args)


compiled_mixed_learned_range = _Compiled(mixed_learned_range)
compiled_lsq = _Compiled(lsq_fake_quant)
#: on the CPU without the C kernels, tensors smaller than this take the quantizer's autograd function
#: instead of a compiled call: its guard check and wrapper (~0.3 ms) cost more than a few thousand
#: elements save (benchmarks/quant_overhead.py: a 16x16x3x3 weight 0.17 ms eager, 0.55 ms compiled)
COMPILED_MIN_ELEMENTS = 1 << 16


def fused_mixed_learned_range(
    x: torch.Tensor, probs: torch.Tensor, ranges: torch.Tensor, levels: tuple[int, ...], signed: bool
) -> torch.Tensor:
    """:func:`mixed_learned_range` by the fastest kernel that takes `x` (module docstring)."""
    if native.usable(x):
        return native.mixed_learned_range(x, probs, ranges, levels, signed)
    return compiled_mixed_learned_range(x, probs, ranges, levels, signed)


def takes_lsq(x: torch.Tensor) -> bool:
    """Whether :func:`fused_lsq` is faster for `x` than LSQ's autograd function (quantizers.py)."""
    return native.usable(x) or x.is_cuda or x.numel() >= COMPILED_MIN_ELEMENTS


def fused_lsq(x: torch.Tensor, step: torch.Tensor, qn: float, qp: float, grad_scale: float) -> torch.Tensor:
    """:func:`lsq_fake_quant` by the fastest kernel that takes `x`; `step` already broadcasts
    against `x` (one element, or one per output channel)."""
    if native.usable(x):
        return native.lsq(x, step, qn, qp, grad_scale)
    bounds = x.new_tensor([qn, qp, grad_scale])  # tensors: one compiled kernel serves every bit-width
    return compiled_lsq(x, step, bounds[0], bounds[1], bounds[2])
