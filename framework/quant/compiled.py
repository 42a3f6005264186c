"""The `compiled` backend's operations: the reference math (:mod:`framework.quant.reference`) as plain
tensor code given to `torch.compile`, which fuses each operation and its gradients into one loop
each way (the GPU path: `quant.kernels=auto` takes it on CUDA).

- :func:`lsq_fake_quant`: LSQ with the reference's tie rule, written so autograd gives it::

      v = x / s,   c = v where Qn <= v <= Qp, else clamp(v, Qn, Qp) (detached)
      q = round_ste(c) * s

  so `dq/dx = 1[Qn <= v <= Qp]` (the whole gradient on a bound) and
  `dq/ds = round(c) - v * 1[Qn <= v <= Qp]`; the step's gradient is scaled by `grad_scale` through
  `s = step + (g step - g step).detach()` scaled in the backward only, so the forward uses `step`
  exactly. The bounds are tensors so that one compiled kernel serves every bit-width.
- :func:`framework.quant.reference.mixed_learned_range` compiled as it is.

The min-max weight mix has no compiled version: the backend uses the reference op (a weight is a few
thousand elements; one node either way).
"""

from __future__ import annotations

import torch

from framework.quant import reference
from framework.quant.rounding import round_ste


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, qn: torch.Tensor, qp: torch.Tensor,
                   grad_scale: torch.Tensor) -> torch.Tensor:
    """LSQ as plain tensor code (module docstring); `step` already broadcasts against `x`."""
    scaled = step * grad_scale
    s = step.detach() + (scaled - scaled.detach())  # exactly `step` forward, grad_scale backward
    v = x / s
    inside = (v >= qn) & (v <= qp)
    c = torch.where(inside, v, torch.clamp(v, qn, qp).detach())
    return round_ste(c) * s


#: compiled variants per function: tensor rank (conv, linear) x grad mode (train, eval) x whether the
#: input needs a gradient (the image does not) x per-tensor/per-channel steps, with room to spare
RECOMPILE_LIMIT = 64


class Compiled:
    """A function compiled with `torch.compile` on first use. Where compilation fails (no compiler
    for the device), the error is kept in `failure` and every call runs the function eagerly: the
    same math, recorded by the seam (framework.quant.kernels.describe)."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failure = fn, None, None

    def __call__(self, *args):
        if self.failure is None:
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
            except Exception as err:  # no compiler for this device
                self.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                import logging

                logging.getLogger(__name__).warning(
                    "torch.compile of %s failed (%s); quant.kernels=compiled runs it eagerly",
                    self.fn.__name__, self.failure)
        return self.fn(*args)


compiled_mixed_learned_range = Compiled(reference.mixed_learned_range)
compiled_lsq = Compiled(lsq_fake_quant)


def lsq(x: torch.Tensor, step: torch.Tensor, qn: float, qp: float, grad_scale: float) -> torch.Tensor:
    """:func:`lsq_fake_quant` compiled, with float bounds (made tensors for one kernel per rank)."""
    bounds = x.new_tensor([qn, qp, grad_scale])
    return compiled_lsq(x, step, bounds[0], bounds[1], bounds[2])


def failures() -> list[str]:
    """What failed to compile in this process (empty: every compiled call ran compiled)."""
    return [f"{c.fn.__name__}: {c.failure}" for c in (compiled_lsq, compiled_mixed_learned_range) if c.failure]
