"""Quantized layers: fixed bit-widths (:class:`QConv2d`, :class:`QLinear`) and searchable mixtures
(:class:`SearchConv2d`, :class:`SearchLinear`).

A fixed layer quantizes its input activation with `a_bits` and its weight with `w_bits`, then runs
the float op on the quantized tensors (fake quantization). Grouped and depthwise convolutions work
unchanged because the layer keeps the original `groups`, stride and padding.

A searchable layer (EdMIPS, Cai & Vasconcelos, CVPR 2020; the composite form of GMPQ) holds logits
`alpha_w` over candidate weight bit-widths `B_w` and `alpha_a` over activation bit-widths `B_a`, and
runs **one** convolution on mixed inputs and mixed weights::

    x_mix = sum_i softmax(alpha_a)_i * Qa(x; a_i)
    W_mix = sum_j softmax(alpha_w)_j * Qw(W; b_j)      # one shared full-precision W
    y     = conv(x_mix, W_mix)

instead of one convolution per candidate (K times the cost). Optional Gumbel-softmax sampling with
temperature `tau` (training only) and joint weight/activation bits (one set of logits for both,
SAQ's `wa_same_bit`). The expected bit-width `E[b] = sum_i softmax(alpha)_i * b_i` feeds the
differentiable cost model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from framework.quant import kernels, reference
from framework.quant.quantizers import (
    FULL_PRECISION,
    LearnedRangeActQuantizer,
    MinMaxWeightQuantizer,
    check_bits,
    make_act_quantizer,
    make_weight_quantizer,
    mixed_minmax_weight,
)


def _copy_float(cls: type, module: nn.Module) -> nn.Module:
    """An instance of `cls` (a subclass of the module's float class) with the same geometry and weights."""
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Conv2d):
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode, **kwargs)
    else:
        layer = cls(module.in_features, module.out_features, module.bias is not None, **kwargs)
    layer.load_state_dict(module.state_dict(), strict=False)
    return layer


class _QuantMixin:
    """Shared by fixed-precision layers: the input and weight quantizers and their bits."""

    w_bits: int
    a_bits: int
    macs: float  # multiply-accumulates at the resolution the layer was traced at (0 if unknown)

    def _init_quant(self, w_bits: int, a_bits: int, qcfg, out_channels: int) -> None:
        self.w_bits, self.a_bits = check_bits(w_bits), check_bits(a_bits)
        self.weight_quant = make_weight_quantizer(qcfg.weight, self.w_bits, out_channels,
                                                  per_channel=bool(qcfg.per_channel))
        self.act_quant = make_act_quantizer(qcfg.activation, self.a_bits, float(qcfg.act_init_range),
                                            str(qcfg.get("act_init", "lsq")))
        self.macs = 0.0
        # SAQ (sharpness-aware quantization) hooks: a perturbation added *after* quantization, and the
        # quantized weight of the last forward pass kept with its gradient (case 3 perturbs along it)
        self.weight_eps: torch.Tensor | None = None
        self.keep_quantized_weight = False
        self.quantized_weight: torch.Tensor | None = None

    def _quantized_weight(self) -> torch.Tensor:
        w_q = self.weight_quant(self.weight)  # type: ignore[attr-defined]
        if self.keep_quantized_weight:
            if w_q is self.weight:  # 32 bits: Q is the identity, so grad w.r.t. Q(w) is the weight's grad
                w_q = w_q.view_as(w_q)
            w_q.retain_grad()
            self.quantized_weight = w_q
        if self.weight_eps is not None:
            w_q = w_q + self.weight_eps
        return w_q

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"  # type: ignore[misc]


class QConv2d(_QuantMixin, nn.Conv2d):
    """A convolution with fixed weight and input-activation bit-widths."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, qcfg) -> QConv2d:
        layer = _copy_float(cls, conv)
        layer._init_quant(w_bits, a_bits, qcfg, conv.out_channels)
        return layer.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self._quantized_weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """A linear layer with fixed weight and input-activation bit-widths."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, qcfg) -> QLinear:
        layer = _copy_float(cls, linear)
        layer._init_quant(w_bits, a_bits, qcfg, linear.out_features)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self._quantized_weight(), self.bias)


class _SearchMixin:
    """Logits over candidate bit-widths and the mixed quantized input and weight."""

    macs: float
    gumbel_tau: float | None

    def _init_search(self, w_candidates: Sequence[int], a_candidates: Sequence[int], qcfg, out_channels: int) -> None:
        self.w_candidates = tuple(sorted({check_bits(b) for b in w_candidates}))
        self.a_candidates = tuple(sorted({check_bits(b) for b in a_candidates}))
        self.joint = bool(qcfg.joint_wa)
        if self.joint and self.w_candidates != self.a_candidates:
            raise ValueError("joint weight/activation bits need the same candidate sets")
        init = float(qcfg.alpha_init)
        self.alpha_w = nn.Parameter(torch.full((len(self.w_candidates),), init))
        self.alpha_a = None if self.joint else nn.Parameter(torch.full((len(self.a_candidates),), init))
        per_channel = bool(qcfg.per_channel)
        self.weight_quants = nn.ModuleList(
            make_weight_quantizer(qcfg.weight, b, out_channels, per_channel) for b in self.w_candidates
        )
        init_range = float(qcfg.act_init_range)
        act_init = str(qcfg.get("act_init", "lsq"))
        self.act_quants = nn.ModuleList(make_act_quantizer(qcfg.activation, b, init_range, act_init)
                                        for b in self.a_candidates)
        self.gumbel_tau = qcfg.gumbel_tau
        # learned-range activation candidates mix in one op of the kernel backend, once their sign is known
        self.fusable_act = all(isinstance(q, LearnedRangeActQuantizer) for q in self.act_quants)
        # min-max weight candidates have no state: their mix is one op (quantizers.mixed_minmax_weight)
        self.one_op_weight_mix = all(isinstance(q, MinMaxWeightQuantizer) for q in self.weight_quants)
        # the bounds Qp_j of such a mix without a full-precision candidate (None otherwise)
        qps = [2 ** (b - 1) - 1 for b in self.w_candidates] if self.one_op_weight_mix else []
        self.register_buffer("minmax_qps", torch.tensor(qps, dtype=torch.float32)
                             if qps and max(self.w_candidates) < FULL_PRECISION else None, persistent=False)
        self.macs = 0.0
        self.register_buffer("w_bit_values", torch.tensor(self.w_candidates, dtype=torch.float32), persistent=False)
        self.register_buffer("a_bit_values", torch.tensor(self.a_candidates, dtype=torch.float32), persistent=False)

    def _logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha_w, self.alpha_w if self.alpha_a is None else self.alpha_a

    def bit_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax of the logits (the policy's belief, used for cost and derivation)."""
        aw, aa = self._logits()
        pw = F.softmax(aw, dim=0)
        return pw, pw if self.alpha_a is None else F.softmax(aa, dim=0)

    def _mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.gumbel_tau:
            aw, aa = self._logits()
            pw = F.gumbel_softmax(aw, tau=float(self.gumbel_tau), hard=False)
            pa = pw if self.alpha_a is None else F.gumbel_softmax(aa, tau=float(self.gumbel_tau), hard=False)
            return pw, pa
        return self.bit_probabilities()

    def expected_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[b_w], E[b_a] under the softmax of the logits (differentiable w.r.t. the logits)."""
        pw, pa = self.bit_probabilities()
        return (pw * self.w_bit_values).sum(), (pa * self.a_bit_values).sum()

    def _fusable_sign(self) -> bool | None:
        """The common sign of the activation candidates once known (None: not fusable yet)."""
        signs = {q._signed for q in self.act_quants}
        return bool(signs.pop()) if len(signs) == 1 and -1 not in signs else None

    def mixed_input_and_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_mix, W_mix), each mix one op of the kernel backend (framework.quant.kernels). Without
        Gumbel sampling the op also takes the softmax of the logits (and the ranges' |rho| + 1e-8),
        which the native backend computes in the same call; with it, the sampled mixing weights."""
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        backend = kernels.active()
        aw, aa = self._logits()
        sampled = bool(self.training and self.gumbel_tau)
        signed = self._fusable_sign() if self.fusable_act else None
        probs = self._mixing_weights() if sampled else None
        if signed is not None and not sampled:
            rhos = [q.range for q in self.act_quants]
            x_mix = backend.mixed_learned_range_of_params(x, aa, rhos, self._act_levels(signed), signed)
        elif signed is not None:
            ranges = reference.ranges_of([q.range for q in self.act_quants])
            x_mix = backend.mixed_learned_range(x, probs[1], ranges, self._act_levels(signed), signed)
        else:
            probs = probs or self._mixing_weights()
            x_mix = sum(p * q(x) for p, q in zip(probs[1], self.act_quants, strict=True))
        qps = self.minmax_qps
        if qps is not None and not sampled:
            return x_mix, backend.mixed_minmax_of_logits(weight, aw, qps)
        pw = (probs or self._mixing_weights())[0]
        if self.one_op_weight_mix:
            return x_mix, mixed_minmax_weight(weight, pw, self.w_candidates)
        return x_mix, sum(p * q(weight) for p, q in zip(pw, self.weight_quants, strict=True))

    def _act_levels(self, signed: bool) -> tuple[int, ...]:
        return tuple((2 ** (q.bits - 1) - 1) if signed else (2**q.bits - 1) for q in self.act_quants)

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, w_candidates={self.w_candidates}, a_candidates={self.a_candidates}"  # type: ignore[misc]


class SearchConv2d(_SearchMixin, nn.Conv2d):
    """A convolution whose bit-widths are searched: one conv of mixed input and mixed weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_candidates, a_candidates, qcfg) -> SearchConv2d:
        layer = _copy_float(cls, conv)
        layer._init_search(w_candidates, a_candidates, qcfg, conv.out_channels)
        return layer.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_mix, w_mix = self.mixed_input_and_weight(x)
        return self._conv_forward(x_mix, w_mix, self.bias)


class SearchLinear(_SearchMixin, nn.Linear):
    """A linear layer whose bit-widths are searched."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_candidates, a_candidates, qcfg) -> SearchLinear:
        layer = _copy_float(cls, linear)
        layer._init_search(w_candidates, a_candidates, qcfg, linear.out_features)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_mix, w_mix = self.mixed_input_and_weight(x)
        return F.linear(x_mix, w_mix, self.bias)


QUANT_LAYERS = (QConv2d, QLinear)
SEARCH_LAYERS = (SearchConv2d, SearchLinear)
