"""Uniform quantizers with the straight-through estimator (STE).

All quantizers map a tensor to `q = clamp(round(x / s), Qn, Qp) * s` for a step size `s`;
`round` passes its gradient straight through (Bengio et al. 2013), `clamp` zeroes it outside the
range. 32 bits means "not quantized" and returns the input object itself.

- :class:`LSQQuantizer` (Esser et al., "Learned Step Size Quantization", ICLR 2020): `s` is learned.
  Signed (weights): `Qn = -2^(b-1)`, `Qp = 2^(b-1) - 1`; unsigned (activations after ReLU):
  `Qn = 0`, `Qp = 2^b - 1`. The gradient reaching `s` is scaled by `g = 1 / sqrt(N * Qp)`, N the
  number of elements sharing `s`, and
  `dq/ds = -x/s + round(x/s)` inside the range, `Qn` below it, `Qp` above it.
  Init `s = 2 * mean(|x|) / sqrt(Qp)` from the weights, or from the first batch for activations.
  Per-tensor, or per-output-channel for weights.
- :class:`MinMaxWeightQuantizer` (the EdMIPS/GMPQ search quantizer): symmetric, threshold
  `max|W|`, `s = max|W| / (2^(b-1) - 1)`, no state to learn or initialise.
- :class:`LearnedRangeActQuantizer` (PACT, Choi et al. 2018, as in the EdMIPS/GMPQ search):
  activations clipped to `[0, r]` with a learnable `r` (init 6.0), `s = r / (2^b - 1)`; the gradient
  of `r` is 1 where `x >= r` plus the step-size path inside the range.

Activation quantizers decide on their first batch whether their input is signed (a normalised
image, or MobileNet-V2's linear bottleneck outputs) and use a symmetric range if so.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.quant import native
from framework.quant.rounding import round_ste

FULL_PRECISION = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of a `bits`-bit integer grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int) -> int:
    bits = int(bits)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits}; supported: {SUPPORTED_BITS}")
    return bits


class _LSQFunction(torch.autograd.Function):
    """LSQ's forward and its gradients in one op (fewer passes over the tensor than autograd's graph).

    forward:  v = x / s,  q = clamp(round(v), Qn, Qp) * s
    backward: dq/dx = 1[Qn <= v <= Qp];  dq/ds = Qn (v < Qn), Qp (v > Qp), round(v) - v (inside),
              summed over the elements sharing s and scaled by g = 1 / sqrt(N * Qp).
    """

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, grad_scale: float, per_channel: bool):
        s = step.view(-1, *([1] * (x.dim() - 1))) if per_channel else step
        v = x / s
        levels = torch.round(v).clamp_(qn, qp)
        ctx.save_for_backward(v, levels)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.per_channel = qn, qp, grad_scale, per_channel
        return levels * s

    @staticmethod
    def backward(ctx, grad):
        v, levels = ctx.saved_tensors
        inside = ((v >= ctx.qn) & (v <= ctx.qp)).to(grad.dtype)
        grad_x = grad * inside
        # clamp(round(v)) - v * 1[inside] is Qn below the range, Qp above it and round(v) - v inside
        ds = grad * (levels - v * inside)
        grad_s = ds.flatten(1).sum(1) if ctx.per_channel else ds.sum().reshape(1)
        return grad_x, grad_s * ctx.grad_scale, None, None, None, None


class LSQQuantizer(nn.Module):
    """Learned-step-size quantizer for weights (`signed=True`) or activations (`signed=None`: from data)."""

    def __init__(
        self, bits: int, signed: bool | None = True, per_channel: bool = False, channels: int = 1, fused: bool = False
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.per_channel = per_channel
        self.fused = fused
        self.step = nn.Parameter(torch.ones(channels if per_channel else 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self._sync_flags()

    def _sync_flags(self) -> None:
        """Python copies of the buffers, so a forward pass never waits on the device to read them."""
        self._ready = bool(self.initialized)
        self._signed = int(self.signed)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"

    @torch.no_grad()
    def set_step(self, step) -> None:
        """Set the step size(s) by hand and mark the quantizer initialised."""
        self.step.copy_(torch.as_tensor(step, dtype=self.step.dtype).expand_as(self.step))
        self.initialized.fill_(True)
        self._sync_flags()

    def _view(self, step: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return step.view(-1, *([1] * (x.dim() - 1))) if self.per_channel else step

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """`s = 2 mean|x| / sqrt(Qp)`, per tensor or per output channel; fixes the sign if unknown."""
        if self._signed < 0:
            self.signed.fill_(int(bool((x < 0).any())))
            self._sync_flags()
        _, qp = int_range(self.bits, bool(self._signed))
        if self.per_channel:
            mean_abs = x.detach().abs().flatten(1).mean(1)
        else:
            mean_abs = x.detach().abs().mean().reshape(1)
        self.step.copy_((2 * mean_abs / math.sqrt(qp)).clamp_min(1e-8))
        self.initialized.fill_(True)
        self._sync_flags()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        if not self._ready:
            self.initialize(x)
        qn, qp = int_range(self.bits, bool(self._signed))
        n = x.numel() / (self.step.numel() if self.per_channel else 1)
        grad_scale = 1.0 / math.sqrt(n * qp)
        if self.fused:
            from framework.quant import fused

            if fused.takes_lsq(x):  # the C kernel on the CPU, else compiled for large or CUDA tensors
                return fused.fused_lsq(x, self._view(self.step, x), qn, qp, grad_scale)
        return _LSQFunction.apply(x, self.step, qn, qp, grad_scale, self.per_channel)


class MinMaxWeightQuantizer(nn.Module):
    """Symmetric weight quantizer with threshold max|W| (no learned state)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return w
        qp = 2 ** (self.bits - 1) - 1
        step = (w.detach().abs().max() / qp).clamp_min(1e-8)
        # |w / step| <= qp by construction: the clamp only guards rounding error, so it must not
        # cut the gradient of the largest weight
        levels = round_ste(w / step)
        return (levels + (torch.clamp(levels, -qp, qp) - levels).detach()) * step


class _MixedMinMaxFunction(torch.autograd.Function):
    """The supernet's mixed weight over min-max candidates in one op:

        W_mix = sum_j p_j * Q_j(W),   Q_j(W) = clamp(round(W / s_j), -Qp_j, Qp_j) * s_j,   s_j = max|W| / Qp_j

    with `s_j` constant (detached) and round's straight-through gradient, so
    dW_mix/dW = sum_j p_j (1 for probabilities) and dW_mix/dp_j = Q_j(W). The candidates are quantized
    as one (K, N) tensor and the gradients of all p_j come from one matrix-vector product, instead
    of about 8 small operations per candidate each way (the weights of a CIFAR ResNet are a few
    thousand elements, where the cost is the number of operations, not their size).
    """

    @staticmethod
    def forward(ctx, w, probs, qps):
        steps = (w.detach().abs().max() / qps).clamp_min(1e-8)  # (K,)
        shape = (-1, *([1] * w.dim()))
        quantized = torch.round(w.detach().unsqueeze(0) / steps.view(shape))
        quantized = torch.maximum(torch.minimum(quantized, qps.view(shape)), -qps.view(shape)) * steps.view(shape)
        ctx.save_for_backward(quantized, probs)
        return torch.tensordot(probs.to(w.dtype), quantized, dims=1)

    @staticmethod
    def backward(ctx, grad):
        quantized, probs = ctx.saved_tensors
        grad_w = grad * probs.sum().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_p = (quantized.flatten(1) @ grad.flatten()).to(probs.dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_p, None


def mixed_minmax_weight(w: torch.Tensor, probs: torch.Tensor, bits: tuple[int, ...], fused: bool = False) -> torch.Tensor:
    """`sum_j probs[j] * MinMaxWeightQuantizer(bits[j])(w)` in one op (32 bits: `w` itself); `fused`
    takes the C kernel on the CPU (framework.quant.native) where it builds."""
    fp = [j for j, b in enumerate(bits) if b >= FULL_PRECISION]
    low = [j for j, b in enumerate(bits) if b < FULL_PRECISION]
    qps = w.new_tensor([2 ** (bits[j] - 1) - 1 for j in low])
    low_probs = probs[low] if fp else probs
    out = None
    if low:
        out = native.mixed_minmax(w, low_probs, qps) if fused and native.usable(w) else _MixedMinMaxFunction.apply(w, low_probs, qps)
    for j in fp:
        out = probs[j] * w if out is None else out + probs[j] * w
    return out


class _LearnedRangeFunction(torch.autograd.Function):
    """PACT quantization on [lo, r] (lo = 0, or -r for signed inputs) with its gradients in one op.

    forward:  c = clamp(x, lo, r), s = r / L, q = round(c / s) * s
    backward: dq/dx = 1[lo < x < r];  dq/dr = 1 (x >= r), -1 (x <= -r, signed), (round(v) - v) / L inside
    """

    @staticmethod
    def forward(ctx, x, r, levels: int, signed: bool):
        lo = -r if signed else torch.zeros_like(r)
        c = torch.minimum(torch.maximum(x, lo), r)
        s = r / levels
        ctx.save_for_backward(x, r)
        ctx.levels, ctx.signed = levels, signed
        return torch.round(c / s) * s

    @staticmethod
    def backward(ctx, grad):
        x, r = ctx.saved_tensors
        levels = ctx.levels
        above = x >= r
        below = x <= (-r if ctx.signed else 0.0)
        inside = ~(above | below)
        grad_x = grad * inside
        v = x / (r / levels)
        dr = torch.where(inside, (torch.round(v) - v) / levels, above.to(x.dtype))
        if ctx.signed:
            dr = dr - below.to(x.dtype)
        return grad_x, (grad * dr).sum().reshape(r.shape), None, None


class LearnedRangeActQuantizer(nn.Module):
    """PACT-style activation quantizer on [0, r] (or [-r, r] for signed inputs), r learned."""

    def __init__(self, bits: int, init_range: float = 6.0, signed: bool | None = None, fused: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.fused = fused  # the C kernel on the CPU: the supernet's mix with one candidate (native)
        self.range = nn.Parameter(torch.tensor(float(init_range)))
        self.register_buffer("signed", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self._signed = int(self.signed)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._signed = int(self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        if self._signed < 0:
            with torch.no_grad():
                self.signed.fill_(int(bool((x < 0).any())))
            self._signed = int(self.signed)
        signed = bool(self._signed)
        levels = 2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1
        if self.fused and native.usable(x) and native.takes_params(self.range):
            # one call instead of abs, add and five element-wise passes each way; the same values
            # (softmax of one logit is 1 exactly); at x = r exactly it splits the gradient between x
            # and r as torch.minimum does, where this function gives it all to r
            return native.mixed_learned_range_of_params(x, _ONE_LOGIT, [self.range], (levels,), signed)
        return _LearnedRangeFunction.apply(x, self.range.abs() + 1e-8, levels, signed)


_ONE_LOGIT = torch.zeros(1)  # the mixing weight of a single candidate: softmax gives 1.0 exactly

WEIGHT_QUANTIZERS = ("lsq", "minmax")
ACT_QUANTIZERS = ("lsq", "learned_range")


def make_weight_quantizer(
    kind: str, bits: int, out_channels: int, per_channel: bool = False, fused: bool = False
) -> nn.Module:
    if kind == "lsq":
        return LSQQuantizer(bits, signed=True, per_channel=per_channel, channels=out_channels, fused=fused)
    if kind == "minmax":
        return MinMaxWeightQuantizer(bits)
    raise ValueError(f"unknown weight quantizer '{kind}'; choose one of {WEIGHT_QUANTIZERS}")


def make_act_quantizer(kind: str, bits: int, init_range: float = 6.0, fused: bool = False) -> nn.Module:
    if kind == "lsq":
        return LSQQuantizer(bits, signed=None, fused=fused)
    if kind == "learned_range":
        return LearnedRangeActQuantizer(bits, init_range=init_range, fused=fused)
    raise ValueError(f"unknown activation quantizer '{kind}'; choose one of {ACT_QUANTIZERS}")
