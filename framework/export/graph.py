"""The exported network: a quantized model traced into a list of integer layers and plain ops.

:func:`export_graph` traces a model (``torch.fx``, quantized layers kept whole) into an
:class:`ExportGraph`: nodes in execution order, each one of a few ops (``conv``, ``linear``,
``relu``, ``clip``, ``add``, ``maxpool``, ``global_avgpool``, ``flatten``), and one
:class:`IntegerLayer` per conv/linear. Both exporters (the packed safetensors file and ONNX) and the
packed model's interpreter read this one description, so they cannot disagree on the network.

An integer layer is what a fixed-precision layer computes, on integer codes:

    input codes   c_x = clamp(round(x / s_x), x_min, x_max)          (LSQ, or PACT with s_x = r / L)
    weight codes  c_w = clamp(round(W / s_w), w_min, w_max)          (LSQ step, or max|W| / Qp for min-max)
    output        y[o] = s_x * s_w[o] * sum(c_x * c_w)[o] + b[o]

Batch norm after a convolution (y -> gamma (y - mu) / sigma + beta, sigma = sqrt(var + eps)) folds
exactly into this form by keeping the codes and changing only the per-channel scale and the bias:

    s_w'[o] = s_w[o] * gamma[o] / sigma[o]        b'[o] = (b[o] - mu[o]) * gamma[o] / sigma[o] + beta[o]

(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, sec. 3.2, with the fold moved into the scale so the weights stay on the grid
they were trained on; re-quantizing folded float weights would move them off it). A per-tensor
weight step therefore becomes per-channel, and a negative gamma gives a negative scale. A layer at 32
bits keeps float weights (batch norm folded into them) or a float input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from framework.errors import MPQError
from framework.quant.layers import QConv2d, QLinear
from framework.quant.quantizers import (
    FULL_PRECISION,
    LearnedRangeActQuantizer,
    LSQQuantizer,
    MinMaxWeightQuantizer,
    int_range,
)

SUPPORTED = ("Conv2d and Linear (quantized or not, grouped and depthwise too), BatchNorm2d after a conv, "
             "ReLU, ReLU6/Hardtanh, MaxPool2d, global average pooling, flatten, residual add, Dropout, Identity")


@dataclass
class ActivationGrid:
    """The integer grid of a layer's input: codes in [qmin, qmax], value = code * scale."""

    bits: int
    signed: bool
    qmin: int
    qmax: int
    scale: np.float32

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class IntegerLayer:
    """One conv or linear layer as integer codes and scales (batch norm folded).

    `codes` (int8, the weight's shape) and `weight_scale` (one per output channel) when `w_bits < 32`,
    else `weight`; `bias` or None; `input` the activation grid or None (a float input). Scales, biases
    and folded float weights are float64: the framework's float32 values, folded without rounding
    (ONNX gets them rounded to float32)."""

    name: str
    kind: str  # conv | linear
    w_bits: int
    a_bits: int
    shape: tuple[int, ...]
    attrs: dict[str, Any]
    codes: np.ndarray | None = None
    w_signed: bool = True
    w_qmin: int = 0
    w_qmax: int = 0
    weight_scale: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    input: ActivationGrid | None = None
    folded_bn: str | None = None

    @property
    def quantized_weight(self) -> bool:
        return self.codes is not None

    @property
    def out_channels(self) -> int:
        return int(self.shape[0])

    def to_json(self) -> dict[str, Any]:
        """The layer's row of the layer table (the tensors travel separately)."""
        return {"kind": self.kind, "w_bits": self.w_bits, "a_bits": self.a_bits, "shape": list(self.shape),
                "attrs": self.attrs, "w_signed": self.w_signed, "w_qmin": self.w_qmin, "w_qmax": self.w_qmax,
                "bias": self.bias is not None, "input": None if self.input is None else self.input.to_json(),
                "folded_bn": self.folded_bn}


@dataclass
class ExportGraph:
    """Nodes in execution order (`{"name", "op", "inputs", ...attributes}`) and the integer layers
    the `conv`/`linear` nodes name (`"layer"`). One input (`"input"`) and one output."""

    nodes: list[dict[str, Any]]
    layers: dict[str, IntegerLayer] = field(default_factory=dict)
    output: str = ""

    def last_layer(self) -> IntegerLayer:
        """The layer whose output is the model's output (the classifier)."""
        by_name = {node["name"]: node for node in self.nodes}
        node = by_name[self.output]
        while node["op"] not in ("conv", "linear"):
            if not node["inputs"]:
                raise MPQError("the exported graph's output does not come from a conv or linear layer")
            node = by_name[node["inputs"][0]]
        return self.layers[node["layer"]]


class _Tracer(fx.Tracer):
    """Keeps the quantized layers whole (their quantizers hold state and Python branches)."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, (QConv2d, QLinear)) or super().is_leaf_module(module, qualname)


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy().copy()


def _f64(tensor: torch.Tensor) -> np.ndarray:
    """A float32 parameter's values, held in float64 (exactly)."""
    return tensor.detach().to(torch.float32).to(torch.float64).cpu().numpy().copy()


def _activation_grid(quantizer: nn.Module, name: str) -> ActivationGrid | None:
    """The grid of the quantizer in front of layer `name`, computed as its forward pass computes it."""
    bits = int(quantizer.bits)
    if bits >= FULL_PRECISION:
        return None
    signed = int(quantizer.signed)
    if isinstance(quantizer, LSQQuantizer):
        if not bool(quantizer.initialized) or signed < 0:
            raise MPQError(f"layer '{name}': its activation quantizer was never initialised (no batch went through it); "
                           "export a fine-tuned or calibrated checkpoint")
        qmin, qmax = int_range(bits, bool(signed))
        scale = quantizer.step.detach().reshape(-1)[0]
    elif isinstance(quantizer, LearnedRangeActQuantizer):
        if signed < 0:
            raise MPQError(f"layer '{name}': its activation quantizer has not seen a batch, so its sign is unknown; "
                           "export a fine-tuned or calibrated checkpoint")
        levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        qmin, qmax = (-levels if signed else 0), levels
        scale = (quantizer.range.detach().abs() + 1e-8) / levels  # as LearnedRangeActQuantizer.forward
    else:
        raise MPQError(f"layer '{name}': activation quantizer {type(quantizer).__name__} cannot be exported")
    return ActivationGrid(bits, bool(signed), qmin, qmax, np.float32(scale.to(torch.float32).item()))


def _weight_codes(module: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(codes int8, scale per output channel (float32 values in float64), qmin, qmax), with the
    arithmetic of the forward pass."""
    quantizer, weight = module.weight_quant, module.weight.detach()
    bits = int(quantizer.bits)
    out = weight.shape[0]
    if isinstance(quantizer, LSQQuantizer):
        if not bool(quantizer.initialized):
            raise MPQError(f"layer '{name}': its weight quantizer was never initialised; export a fine-tuned checkpoint")
        qmin, qmax = int_range(bits, True)
        step = quantizer.step.detach()
        view = step.view(-1, *([1] * (weight.dim() - 1))) if quantizer.per_channel else step
        codes = torch.round(weight / view).clamp_(qmin, qmax)
        scale = step.expand(out) if not quantizer.per_channel else step
    elif isinstance(quantizer, MinMaxWeightQuantizer):
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        step = (weight.abs().max() / qmax).clamp_min(1e-8)
        codes = torch.round(weight / step).clamp_(qmin, qmax)
        scale = step.reshape(1).expand(out)
    else:
        raise MPQError(f"layer '{name}': weight quantizer {type(quantizer).__name__} cannot be exported")
    return codes.to(torch.int8).cpu().numpy(), _f64(scale), qmin, qmax


def _conv_attrs(module: nn.Conv2d, name: str) -> dict[str, Any]:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise MPQError(f"cannot export layer '{name}': padding {module.padding!r} ({module.padding_mode}); "
                       "only explicit zero padding is supported")
    return {"stride": list(module.stride), "padding": list(module.padding), "dilation": list(module.dilation),
            "groups": int(module.groups)}


def integer_layer(module: nn.Module, name: str) -> IntegerLayer:
    """The integer form of a conv/linear module (quantized or float), before any batch-norm fold."""
    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    attrs = _conv_attrs(module, name) if kind == "conv" else {}
    bias = None if module.bias is None else _f64(module.bias)
    shape = tuple(module.weight.shape)
    if isinstance(module, (QConv2d, QLinear)):
        layer = IntegerLayer(name, kind, int(module.w_bits), int(module.a_bits), shape, attrs, bias=bias,
                             input=_activation_grid(module.act_quant, name))
        if module.w_bits < FULL_PRECISION:
            layer.codes, layer.weight_scale, layer.w_qmin, layer.w_qmax = _weight_codes(module, name)
        else:
            layer.weight = _f32(module.weight)
        return layer
    return IntegerLayer(name, kind, FULL_PRECISION, FULL_PRECISION, shape, attrs, weight=_f32(module.weight), bias=bias)


def fold_batch_norm(layer: IntegerLayer, bn: nn.BatchNorm2d, bn_name: str) -> None:
    """Fold eval-mode batch norm into `layer` (in place): the codes stay, the scale and bias change."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise MPQError(f"cannot export '{bn_name}': batch norm without running statistics")
    if layer.out_channels != bn.num_features:
        raise MPQError(f"cannot fold '{bn_name}' into '{layer.name}': {bn.num_features} features for "
                       f"{layer.out_channels} channels")
    mean = bn.running_mean.detach().double()
    gain = (bn.weight.detach().double() if bn.affine else torch.ones_like(mean)) / torch.sqrt(
        bn.running_var.detach().double() + bn.eps)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(mean)
    bias = torch.zeros_like(mean) if layer.bias is None else torch.from_numpy(layer.bias).double()
    layer.bias = ((bias - mean) * gain + beta).numpy()
    if layer.quantized_weight:
        layer.weight_scale = (torch.from_numpy(layer.weight_scale).double() * gain).numpy()
    else:
        weight = torch.from_numpy(layer.weight).double()
        layer.weight = (weight * gain.view(-1, *([1] * (weight.dim() - 1)))).numpy()
    layer.folded_bn = bn_name


def _int_arg(value, default: int) -> int:
    return default if value is None else int(value)


def _is_global_pool(output_size) -> bool:
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    return all(s == 1 for s in sizes)


class _Builder:
    """Turns the fx graph into export nodes, one fx node at a time."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model, self.fx_graph = model, graph
        self.nodes: list[dict[str, Any]] = []
        self.layers: dict[str, IntegerLayer] = {}
        self.alias: dict[str, str] = {}  # fx node -> the export value it equals (dropout, identity, folded bn)
        self.users = {node.name: len(node.users) for node in graph.nodes}

    def value(self, arg) -> str:
        if not isinstance(arg, fx.Node):
            raise MPQError(f"cannot export: a tensor input {arg!r} that is not computed by the network")
        return self.alias.get(arg.name, arg.name)

    def emit(self, node: fx.Node, op: str, inputs: list, **attrs) -> None:
        self.nodes.append({"name": node.name, "op": op, "inputs": [self.value(a) for a in inputs], **attrs})

    def producer(self, name: str) -> dict[str, Any] | None:
        return next((n for n in reversed(self.nodes) if n["name"] == name), None)

    def unsupported(self, where: str, what: str) -> MPQError:
        return MPQError(f"cannot export layer '{where}' ({what}): supported are {SUPPORTED}")

    def module(self, node: fx.Node) -> None:
        name = str(node.target)
        module = self.model.get_submodule(name)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            self.layers[name] = integer_layer(module, name)
            self.emit(node, "conv" if isinstance(module, nn.Conv2d) else "linear", node.args[:1], layer=name)
        elif isinstance(module, nn.BatchNorm2d):
            source = node.args[0]
            produced = self.producer(self.value(source))
            if produced is None or produced["op"] != "conv" or self.users.get(source.name, 0) != 1 \
                    or self.layers[produced["layer"]].folded_bn:
                raise self.unsupported(name, "a BatchNorm2d that does not directly follow a convolution")
            fold_batch_norm(self.layers[produced["layer"]], module, name)
            self.alias[node.name] = self.value(source)
        elif isinstance(module, nn.ReLU):
            self.emit(node, "relu", node.args[:1])
        elif isinstance(module, nn.Hardtanh):  # ReLU6 too
            self.emit(node, "clip", node.args[:1], min=float(module.min_val), max=float(module.max_val))
        elif isinstance(module, nn.MaxPool2d):
            self._maxpool(node, module, name)
        elif isinstance(module, nn.AdaptiveAvgPool2d) and _is_global_pool(module.output_size):
            self.emit(node, "global_avgpool", node.args[:1])
        elif isinstance(module, nn.Flatten):
            if module.end_dim != -1:
                raise self.unsupported(name, f"Flatten to dimension {module.end_dim}")
            self.emit(node, "flatten", node.args[:1], start_dim=int(module.start_dim))
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            self.alias[node.name] = self.value(node.args[0])
        else:
            raise self.unsupported(name, type(module).__name__)

    def _maxpool(self, node: fx.Node, module: nn.MaxPool2d, name: str) -> None:
        pair = nn.modules.utils._pair
        if module.return_indices:
            raise self.unsupported(name, "MaxPool2d returning indices")
        stride = module.stride if module.stride is not None else module.kernel_size
        self.emit(node, "maxpool", node.args[:1], kernel=list(pair(module.kernel_size)), stride=list(pair(stride)),
                  padding=list(pair(module.padding)), dilation=list(pair(module.dilation)),
                  ceil_mode=bool(module.ceil_mode))

    def function(self, node: fx.Node) -> None:
        target, args, kwargs = node.target, node.args, node.kwargs
        where = getattr(target, "__name__", str(target))
        tensors = [a for a in args if isinstance(a, fx.Node)]
        if target in (operator.add, operator.iadd, torch.add) and len(tensors) == 2 and not kwargs.get("alpha"):
            self.emit(node, "add", tensors)
        elif target in (F.relu, torch.relu):
            self.emit(node, "relu", args[:1])
        elif target is F.relu6:
            self.emit(node, "clip", args[:1], min=0.0, max=6.0)
        elif target is F.hardtanh:
            self.emit(node, "clip", args[:1], min=float(args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)),
                      max=float(args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)))
        elif target is F.adaptive_avg_pool2d and _is_global_pool(args[1] if len(args) > 1 else kwargs["output_size"]):
            self.emit(node, "global_avgpool", args[:1])
        elif target is torch.flatten:
            self._flatten(node, args, kwargs, where)
        elif target is F.dropout:
            self.alias[node.name] = self.value(args[0])
        else:
            raise self.unsupported(f"{node.name}", f"function {where}")

    def _flatten(self, node: fx.Node, args, kwargs, where: str) -> None:
        start = _int_arg(args[1] if len(args) > 1 else kwargs.get("start_dim"), 0)
        end = _int_arg(args[2] if len(args) > 2 else kwargs.get("end_dim"), -1)
        if end != -1:
            raise self.unsupported(node.name, f"{where} to dimension {end}")
        self.emit(node, "flatten", args[:1], start_dim=start)

    def method(self, node: fx.Node) -> None:
        if node.target == "flatten":
            self._flatten(node, node.args, node.kwargs, "Tensor.flatten")
        elif node.target == "relu":
            self.emit(node, "relu", node.args[:1])
        else:
            raise self.unsupported(node.name, f"method Tensor.{node.target}")

    def build(self) -> ExportGraph:
        output = ""
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                if self.nodes:
                    raise MPQError("cannot export a model with more than one input")
                self.nodes.append({"name": "input", "op": "input", "inputs": []})
                self.alias[node.name] = "input"
            elif node.op == "call_module":
                self.module(node)
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node):
                    raise MPQError("cannot export a model whose output is not one tensor")
                output = self.value(result)
            else:
                raise self.unsupported(node.name, f"fx op {node.op}")
        self._drop_dead(output)
        return ExportGraph(self.nodes, self.layers, output)

    def _drop_dead(self, output: str) -> None:
        """Keep only the nodes the output depends on (a folded batch norm leaves none behind)."""
        needed, by_name = {output}, {n["name"]: n for n in self.nodes}
        for node in reversed(self.nodes):
            if node["name"] in needed:
                needed.update(node["inputs"])
        self.nodes = [n for n in self.nodes if n["name"] in needed or n["op"] == "input"]
        used = {by_name[n]["layer"] for n in needed if by_name.get(n, {}).get("op") in ("conv", "linear")}
        self.layers = {k: v for k, v in self.layers.items() if k in used}


def export_graph(model: nn.Module) -> ExportGraph:
    """Trace `model` (evaluation mode, on any device) into an :class:`ExportGraph`.

    One :class:`MPQError` names the first module or function that cannot be exported.
    """
    model = model.eval()
    try:
        traced = _Tracer().trace(model)
    except MPQError:
        raise
    except Exception as err:  # data-dependent control flow and the like
        raise MPQError(f"cannot export {type(model).__name__}: torch.fx cannot trace it "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    with torch.no_grad():
        return _Builder(model, traced).build()
