"""Uniform quantizers with the straight-through estimator (STE).

All quantizers map a tensor to `q = clamp(round(x / s), Qn, Qp) * s` for a step size `s`;
`round` passes its gradient straight through (Bengio et al. 2013), `clamp` zeroes it outside the
range. 32 bits means "not quantized" and returns the input object itself.

- :class:`LSQQuantizer` (Esser et al., "Learned Step Size Quantization", ICLR 2020): `s` is learned.
  Signed (weights): `Qn = -2^(b-1)`, `Qp = 2^(b-1) - 1`; unsigned (activations after ReLU):
  `Qn = 0`, `Qp = 2^b - 1`. The gradient reaching `s` is scaled by `g = 1 / sqrt(N * Qp)`, N the
  number of weights sharing `s`, or an activation's features per example, and
  `dq/ds = -x/s + round(x/s)` inside the range, `Qn` below it, `Qp` above it.
  Init `s = 2 * mean(|w|) / sqrt(Qp)` for weights; for activations the MSE-optimal step on the first
  batch (or the same formula). Per-tensor, or per-output-channel for weights.
- :class:`MinMaxWeightQuantizer` (the EdMIPS/GMPQ search quantizer): symmetric, threshold
  `max|W|`, `s = max|W| / (2^(b-1) - 1)`, no state to learn or initialise.
- :class:`LearnedRangeActQuantizer` (PACT, Choi et al. 2018, as in the EdMIPS/GMPQ search):
  activations clipped to `[0, r]` with a learnable `r` (init 6.0), `s = r / (2^b - 1)`; the gradient
  of `r` is 1 where `x > r` (1/2 at `x == r`) plus the step-size path inside the range.

Each quantizer computes through the process's kernel backend (framework.quant.kernels), whose
reference implementation (framework.quant.reference) states the math and the tie rules.

Activation quantizers decide on their first batch whether their input is signed (a normalised
image, or MobileNet-V2's linear bottleneck outputs) and use a symmetric range if so.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.quant import kernels
from framework.quant.reference import MIN_STEP
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


class LSQQuantizer(nn.Module):
    """Learned-step-size quantizer for weights (`signed=True`) or activations (`activation=True`,
    `signed=None`: the sign is decided on the first batch).

    The step's gradient scale is `g = 1 / sqrt(N * Qp)` (LSQ, section 2.2): N is the number of weights
    sharing the step for a weight quantizer, and the number of features of one example for an
    activation quantizer (`x.numel() / batch`), so the step learns at the same rate whatever the
    micro-batch size, the process count or the gradient accumulation. A step is used at no less than
    :data:`MIN_STEP` (an update that takes it below quantizes with the floor, the gradient straight
    through).

    Initialisation on the first tensor seen: weights `s = 2 mean|w| / sqrt(Qp)` (LSQ); activations
    with `init="mse"` the step minimising `||Q(x) - x||^2` on that batch over 100 steps up to the one
    that clips nothing (the MSE initialisation of LSQ+, Bhalgat et al. 2020); `init="lsq"` the paper's
    `2 mean|x| / sqrt(Qp)`, whose range `2 mean|x| sqrt(Qp)` outgrows the data at 8 bits (a
    normalised image's 8-bit input used 18 of 256 codes); `init="auto"` (the default of
    `quant.act_init`) MSE at 8 bits (the fixed first and last layers' inputs), LSQ's formula below.
    """

    def __init__(self, bits: int, signed: bool | None = True, per_channel: bool = False, channels: int = 1,
                 activation: bool = False, init: str = "lsq"):
        super().__init__()
        self.bits = check_bits(bits)
        self.per_channel = per_channel
        self.activation = activation
        if init not in ACT_INITS:
            raise ValueError(f"unknown LSQ initialisation '{init}'; choose one of {ACT_INITS}")
        self.init = init
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
        """The initial step(s) from `x` (class docstring); fixes the sign if unknown."""
        if self._signed < 0:
            self.signed.fill_(int(bool((x < 0).any())))
            self._sync_flags()
        qn, qp = int_range(self.bits, bool(self._signed))
        mse = self.init == "mse" or (self.init == "auto" and self.bits >= MSE_INIT_FROM_BITS)
        if self.activation and mse and not self.per_channel:
            step = mse_step(x, qn, qp).reshape(1)
        elif self.per_channel:
            step = 2 * x.detach().abs().flatten(1).mean(1) / math.sqrt(qp)
        else:
            step = 2 * x.detach().abs().mean().reshape(1) / math.sqrt(qp)
        self.step.copy_(step.clamp_min(MIN_STEP))
        self.initialized.fill_(True)
        self._sync_flags()

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's `1 / sqrt(N * Qp)` for `x` (class docstring)."""
        _, qp = int_range(self.bits, bool(self._signed))
        if self.activation:
            n = x.numel() / x.shape[0] if x.dim() > 1 else x.numel()
        else:
            n = x.numel() / (self.step.numel() if self.per_channel else 1)
        return 1.0 / math.sqrt(n * qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        if not self._ready:
            self.initialize(x)
        # a step an update took to or below 0 quantizes with MIN_STEP, its gradient passing straight
        # through so it can recover; the parameter itself is not modified (two-pass optimizers perturb
        # and restore it in place around the forward pass)
        step = self.step.detach().clamp_min(MIN_STEP) + (self.step - self.step.detach())
        qn, qp = int_range(self.bits, bool(self._signed))
        return kernels.active().lsq(x, self._view(step, x), qn, qp, self.grad_scale(x))


#: how an LSQ activation quantizer takes its first step (LSQQuantizer)
ACT_INITS = ("auto", "mse", "lsq")
#: `auto`: the MSE-optimal step from this many bits up, LSQ's formula below
MSE_INIT_FROM_BITS = 8


@torch.no_grad()
def mse_step(x: torch.Tensor, qn: int, qp: int, candidates: int = 100, max_elements: int = 1 << 16) -> torch.Tensor:
    """The step `s` minimising `mean((clamp(round(x / s), Qn, Qp) * s - x)^2)` over `candidates` steps
    `s_max * k / candidates`, k = 1..candidates, where `s_max` clips nothing; on an evenly strided
    subset of at most `max_elements` elements of `x` (a scalar tensor)."""
    flat = x.detach().flatten().float()
    if flat.numel() > max_elements:
        flat = flat[:: -(-flat.numel() // max_elements)]
    top = flat.max().clamp_min(0) / qp
    if qn < 0:
        top = torch.maximum(top, flat.min().clamp_max(0) / qn)
    top = top.clamp_min(MIN_STEP)
    steps = top * torch.arange(1, candidates + 1, dtype=flat.dtype) / candidates
    errors = ((torch.round(flat / steps[:, None]).clamp_(qn, qp) * steps[:, None] - flat) ** 2).mean(1)
    return steps[int(torch.argmin(errors))].to(x.dtype)


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
        step = (w.detach().abs().max() / qp).clamp_min(MIN_STEP)
        # |w / step| <= qp by construction: the clamp only guards rounding error, so it must not
        # cut the gradient of the largest weight
        levels = round_ste(w / step)
        return (levels + (torch.clamp(levels, -qp, qp) - levels).detach()) * step


def mixed_minmax_weight(w: torch.Tensor, probs: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
    """`sum_j probs[j] * MinMaxWeightQuantizer(bits[j])(w)` in one op of the active kernel backend
    (32 bits: `w` itself)."""
    fp = [j for j, b in enumerate(bits) if b >= FULL_PRECISION]
    low = [j for j, b in enumerate(bits) if b < FULL_PRECISION]
    qps = w.new_tensor([2 ** (bits[j] - 1) - 1 for j in low])
    low_probs = probs[low] if fp else probs
    out = None
    if low:
        out = kernels.active().mixed_minmax(w, low_probs, qps)
    for j in fp:
        out = probs[j] * w if out is None else out + probs[j] * w
    return out


class LearnedRangeActQuantizer(nn.Module):
    """PACT-style activation quantizer on [0, r] (or [-r, r] for signed inputs), r learned."""

    def __init__(self, bits: int, init_range: float = 6.0, signed: bool | None = None):
        super().__init__()
        self.bits = check_bits(bits)
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
        return kernels.active().learned_range(x, self.range, levels, signed)


WEIGHT_QUANTIZERS = ("lsq", "minmax")
ACT_QUANTIZERS = ("lsq", "learned_range")


def make_weight_quantizer(kind: str, bits: int, out_channels: int, per_channel: bool = False) -> nn.Module:
    if kind == "lsq":
        return LSQQuantizer(bits, signed=True, per_channel=per_channel, channels=out_channels)
    if kind == "minmax":
        return MinMaxWeightQuantizer(bits)
    raise ValueError(f"unknown weight quantizer '{kind}'; choose one of {WEIGHT_QUANTIZERS}")


def make_act_quantizer(kind: str, bits: int, init_range: float = 6.0, init: str = "lsq") -> nn.Module:
    if kind == "lsq":
        return LSQQuantizer(bits, signed=None, activation=True, init=init)
    if kind == "learned_range":
        return LearnedRangeActQuantizer(bits, init_range=init_range)
    raise ValueError(f"unknown activation quantizer '{kind}'; choose one of {ACT_QUANTIZERS}")
