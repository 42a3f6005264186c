"""How much quantizing one layer costs the loss, measured on the full-precision model: the two
sensitivities that `policy=hawq` and `policy=sensitivity` rank the (layer, bits) pairs by.

**HAWQ** (Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
NeurIPS 2020; Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021)::

    Omega_l(w, a) = Tr(H_W_l) / n_W_l * ||Q_w(W_l) - W_l||^2  +  Tr(H_x_l) / n_x_l * ||Q_a(x_l) - x_l||^2

with `Tr(H_W_l)` the Hessian trace of the loss over layer l's weight (n_W_l elements) and `Tr(H_x_l)`
over its input activation x_l on the same batches (n_x_l elements over every sample), both by
Hutchinson's estimator (:mod:`framework.landscape.trace`), and the squared quantization errors of the
weight and of the input over every sample. It is the second-order term `delta^T H delta` of the loss
change for a quantization error `delta` that is isotropic within the block
(`E[delta delta^T] = ||delta||^2 / n I`, so `E[delta^T H delta] = Tr(H) ||delta||^2 / n`): HAWQ's
average Hessian trace times the perturbation's squared norm, for weights and for activations. A
trace estimated below zero (the estimator's noise, or a model away from a minimum) counts as zero:
a negative weight on an error would reward quantizing harder; the provenance keeps the estimate.

**Single-layer loss increase** (ZeroQ, Cai et al., "ZeroQ: A Novel Zero Shot Quantization
Framework", CVPR 2020)::

    Omega_l(w, a) = [L(W_l -> Q_w(W_l)) - L]  +  [L(x_l -> Q_a(x_l)) - L]

each term with layer l's weight, or its input, quantized and every other layer in full precision,
on the same batches; the two add, as ZeroQ assumes the layers' and the operands' effects do (ZeroQ
measures the KL divergence of the outputs on distilled data; here the loss on the batches given: the held-out validation split by default).

**The quantizers** `Q_b` are the fine-tune's (`quant`) at their initialisation, built as
framework.quant.convert builds a fixed layer (`QConv2d`/`QLinear.from_float`): LSQ weights at
`2 mean|W| / sqrt(Qp)` (per output channel with `quant.per_channel`), activations initialised as
`quant.act_init` says on the first batch (as framework.stage.calibrate initialises them on one
training batch). The loss is the mean cross-entropy over the batches, the model in evaluation mode.

Both return scores `-Omega_l(w, a)` per layer and pair for the exact knapsack
(framework.policy.fit_scores_to_budget), which then minimises `sum_l Omega_l` under the budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from framework.landscape.batches import CrossEntropyOnBatches
from framework.landscape.params import evaluation, loss_value
from framework.landscape.trace import LayerTraces, layer_traces
from framework.quant.layers import QConv2d, QLinear
from framework.quant.quantizers import FULL_PRECISION

Scores = dict[str, dict[tuple[int, int], float]]


def candidate_quantizers(module: nn.Module, candidates_w: Sequence[int], candidates_a: Sequence[int],
                         qcfg) -> tuple[dict[int, nn.Module], dict[int, nn.Module]]:
    """Uninitialised weight quantizers of `module` at every w of `candidates_w` and input quantizers at
    every a of `candidates_a`, built as the fine-tune builds its fixed layer under `qcfg` (`quant`)."""
    cls = QConv2d if isinstance(module, nn.Conv2d) else QLinear
    weight = {int(w): cls.from_float(module, int(w), FULL_PRECISION, qcfg).weight_quant for w in candidates_w}
    act = {int(a): cls.from_float(module, FULL_PRECISION, int(a), qcfg).act_quant for a in candidates_a}
    return weight, act


@contextlib.contextmanager
def _replaced_weight(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """`module.weight` holds `value` for the block, then its own values again (bit for bit)."""
    saved = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


@contextlib.contextmanager
def _hooks(model: nn.Module, hooks: Mapping[str, Any]) -> Iterator[None]:
    """Forward pre-hooks `hooks[name]` on the named modules for the block."""
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Inputs:
    """What one pass of the full-precision model over the batches gives: its loss, every layer's
    input quantizers initialised on the first batch, their squared errors summed over every sample."""

    loss: float
    act: dict[str, dict[int, nn.Module]]
    weight: dict[str, dict[int, nn.Module]]
    input_error: dict[str, dict[int, float]]


def _measure_inputs(model: nn.Module, loss: CrossEntropyOnBatches, names: Sequence[str], candidates_w: Sequence[int],
                    candidates_a: Sequence[int], qcfg) -> _Inputs:
    weight, act, errors = {}, {}, {}
    for name in names:
        weight[name], act[name] = candidate_quantizers(model.get_submodule(name), candidates_w, candidates_a, qcfg)
        errors[name] = dict.fromkeys(act[name], 0.0)

    def errors_of(name):
        def hook(module, args):
            x = args[0]
            for a, quantizer in act[name].items():  # the first call initialises the quantizer on this batch
                errors[name][a] += float(((quantizer(x) - x).double() ** 2).sum())
        return hook

    with _hooks(model, {name: errors_of(name) for name in names}):
        base = loss_value(model, loss)
    return _Inputs(base, act, weight, errors)


@torch.no_grad()
def _weight_error(module: nn.Module, quantizer: nn.Module) -> float:
    """`||Q(W) - W||^2` (the first call initialises the quantizer on W)."""
    w = module.weight.detach()
    return float(((quantizer(w) - w).double() ** 2).sum())


def _pairs(candidates_w: Sequence[int], candidates_a: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(w), int(a)) for w in sorted(candidates_w) for a in sorted(candidates_a)]


@dataclass
class HawqSensitivity:
    """HAWQ's measurements per layer: the weight and input traces, the squared quantization errors
    `||Q_w(W) - W||^2` per w and `||Q_a(x) - x||^2` (over every sample) per a; and the batches'
    samples, count and the probes."""

    traces: dict[str, LayerTraces]
    weight_error: dict[str, dict[int, float]]
    input_error: dict[str, dict[int, float]]
    samples: int
    batches: int
    probes: int

    def omega(self, name: str, w: int, a: int) -> float:
        """`Omega_l(w, a)` of the module docstring."""
        t = self.traces[name]
        return (max(t.weight.trace, 0.0) / t.weight.numel * self.weight_error[name][int(w)]
                + max(t.input.trace, 0.0) / t.input.numel * self.input_error[name][int(a)])

    def scores(self) -> Scores:
        """`-Omega_l(w, a)` per layer and pair (the knapsack maximises)."""
        return {name: {(w, a): -self.omega(name, w, a) for w, a in _pairs(self.weight_error[name], self.input_error[name])}
                for name in self.traces}

    def record(self) -> dict[str, Any]:
        """The provenance: per layer the traces with their standard errors and element counts, and
        the squared errors per bit-width; the samples, batches and probes."""
        layers = {name: {"weight_trace": t.weight.as_dict(), "input_trace": t.input.as_dict(),
                         "weight_error": {str(w): e for w, e in self.weight_error[name].items()},
                         "input_error": {str(a): e for a, e in self.input_error[name].items()}}
                  for name, t in self.traces.items()}
        return {"samples": self.samples, "batches": self.batches, "probes": self.probes, "layers": layers}


def hawq_sensitivity(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
                     candidates_w: Sequence[int], candidates_a: Sequence[int], qcfg, probes: int, seed: int = 0,
                     hold_graphs: bool = True) -> HawqSensitivity:
    """HAWQ's `Omega_l(w, a)` ingredients for the layers `names` of the full-precision `model` on
    `batches`: traces from `probes` Rademacher probes drawn from `seed`, errors of the quantizers
    `qcfg` builds at the candidate bits. The model is left as it was."""
    loss = CrossEntropyOnBatches(batches)
    inputs = _measure_inputs(model, loss, names, candidates_w, candidates_a, qcfg)
    weight_error = {name: {w: _weight_error(model.get_submodule(name), q) for w, q in inputs.weight[name].items()}
                    for name in names}
    traces = layer_traces(model, batches, names, probes, seed, hold_graphs)
    return HawqSensitivity(traces, weight_error, inputs.input_error, loss.samples, len(loss.batches), int(probes))


@dataclass
class LossSensitivity:
    """The single-layer loss increases per layer: `weight[l][w]` with the weight at w bits,
    `input[l][a]` with the input at a bits (everything else in full precision); the full-precision
    loss, the samples and the batches."""

    loss: float
    weight: dict[str, dict[int, float]]
    input: dict[str, dict[int, float]]
    samples: int
    batches: int

    def omega(self, name: str, w: int, a: int) -> float:
        """`Omega_l(w, a)` of the module docstring."""
        return self.weight[name][int(w)] + self.input[name][int(a)]

    def scores(self) -> Scores:
        """`-Omega_l(w, a)` per layer and pair (the knapsack maximises)."""
        return {name: {(w, a): -self.omega(name, w, a) for w, a in _pairs(self.weight[name], self.input[name])}
                for name in self.weight}

    def record(self) -> dict[str, Any]:
        """The provenance: the full-precision loss, per layer the loss increases per bit-width, the
        samples and batches."""
        layers = {name: {"weight_loss_increase": {str(w): d for w, d in self.weight[name].items()},
                         "input_loss_increase": {str(a): d for a, d in self.input[name].items()}}
                  for name in self.weight}
        return {"loss": self.loss, "samples": self.samples, "batches": self.batches, "layers": layers}


def loss_sensitivity(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
                     candidates_w: Sequence[int], candidates_a: Sequence[int], qcfg) -> LossSensitivity:
    """The single-layer loss increases of the layers `names` of the full-precision `model` on
    `batches`, under the quantizers `qcfg` builds at the candidate bits. The model is left as it was."""
    loss = CrossEntropyOnBatches(batches)
    inputs = _measure_inputs(model, loss, names, candidates_w, candidates_a, qcfg)
    weight_rise: dict[str, dict[int, float]] = {}
    input_rise: dict[str, dict[int, float]] = {}
    with evaluation(model):
        for name in names:
            module = model.get_submodule(name)
            weight_rise[name] = {}
            for w, quantizer in inputs.weight[name].items():
                with torch.no_grad():
                    quantized = quantizer(module.weight.detach())
                with _replaced_weight(module, quantized):
                    weight_rise[name][w] = loss_value(model, loss) - inputs.loss
            input_rise[name] = {}
            for a, quantizer in inputs.act[name].items():
                def hook(_, args, quantizer=quantizer):
                    return (quantizer(args[0]), *args[1:])

                with _hooks(model, {name: hook}):
                    input_rise[name][a] = loss_value(model, loss) - inputs.loss
    return LossSensitivity(inputs.loss, weight_rise, input_rise, loss.samples, len(loss.batches))
