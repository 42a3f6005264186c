"""A runnable torch model that computes an :class:`ExportGraph` on integer codes.

Each integer layer quantizes its input to codes exactly as the framework's quantizer does
(`clamp(round(x / s_x), x_min, x_max)`, in the input's precision), then accumulates `sum(c_x * c_w)` with both
operands held as integer-valued float tensors (torch has no integer convolution on the CPU). The
sum is exact, as an int32 accumulator's would be, when every partial sum is an integer the float
type represents exactly: float32 when `fan_in * max|c_x| * max|c_w| < 2^24` (most low-bit layers),
float64 (exact below 2^53) otherwise. Only then is the sum scaled, `y = (s_x * s_w[o]) * acc + b[o]`
in float64. The model carries float64 values between the layers: it is the integer model the fake
quantization stands for, computed without float32's rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framework.export.graph import ExportGraph, IntegerLayer


class IntegerLayerModule(nn.Module):
    """One conv/linear layer on integer codes (or float, at 32 bits) with folded scales and bias."""

    def __init__(self, layer: IntegerLayer):
        super().__init__()
        self.name, self.kind, self.attrs = layer.name, layer.kind, dict(layer.attrs)
        grid = layer.input
        self.grid = None if grid is None else (grid.qmin, grid.qmax)
        self.register_buffer("input_scale", torch.tensor(float(grid.scale) if grid else 1.0, dtype=torch.float32))
        if layer.quantized_weight:
            self.register_buffer("codes", torch.from_numpy(layer.codes.astype("int8")))
            self.register_buffer("weight_scale", torch.from_numpy(layer.weight_scale.astype("float64")))
        else:
            self.register_buffer("codes", None)
            self.register_buffer("weight_float", torch.from_numpy(layer.weight.astype("float64")))
        bias = layer.bias if layer.bias is not None else np.zeros(layer.out_channels)
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float64))
        self.accumulator = torch.float64
        if grid is not None and layer.quantized_weight:
            fan_in = int(np.prod(layer.shape[1:]))
            largest = fan_in * max(abs(grid.qmin), abs(grid.qmax)) * int(np.abs(layer.codes).max(initial=0))
            if largest < 2**24:
                self.accumulator = torch.float32

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input's codes, computed as the framework's quantizer computes them, in `x`'s precision."""
        qmin, qmax = self.grid
        return torch.clamp(torch.round(x / self.input_scale.to(x.dtype)), qmin, qmax)

    def accumulate(self, x: torch.Tensor, magnitude: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sum(c_x * c_w), s_x * s_w[o])` before the bias; with `magnitude`, `sum(|c_x * c_w|)`
        instead (what bounds the float rounding of the sum)."""
        dtype = self.accumulator if not magnitude else torch.float64
        if self.grid is not None:
            operand, scale = self.input_codes(x).to(dtype), self.input_scale.double()
        else:
            operand, scale = x.to(dtype), torch.ones((), dtype=torch.float64, device=x.device)
        if self.codes is not None:
            weight, scale = self.codes.to(dtype), scale * self.weight_scale.double()
        else:
            weight = self.weight_float.to(dtype)
        if magnitude:
            operand, weight = operand.abs(), weight.abs()
        if self.kind == "conv":
            a = self.attrs
            acc = F.conv2d(operand, weight, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            acc = F.linear(operand, weight)
        return acc.double(), scale.expand(weight.shape[0]) if scale.dim() == 0 else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc, scale = self.accumulate(x)
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1, -1)
        return (acc * scale.view(shape) + self.bias.double().view(shape)).to(x.dtype)


class IntegerModel(nn.Module):
    """Interprets an export graph; `forward(images) -> logits`, computed in float64 from the images on
    (every value between the layers too), so that the only roundings are float64's: the integer
    arithmetic the quantized model stands for, to about 1e-16."""

    def __init__(self, graph: ExportGraph):
        super().__init__()
        self.nodes = [dict(node) for node in graph.nodes]
        self.output = graph.output
        self.index = {name: i for i, name in enumerate(graph.layers)}
        self.integer_layers = nn.ModuleList(IntegerLayerModule(layer) for layer in graph.layers.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for node in self.nodes:
            op, args = node["op"], [values[name] for name in node["inputs"]]
            if op == "input":
                out = x.double()
            elif op in ("conv", "linear"):
                out = self.integer_layers[self.index[node["layer"]]](args[0])
            elif op == "relu":
                out = torch.relu(args[0])
            elif op == "clip":
                out = torch.clamp(args[0], node["min"], node["max"])
            elif op == "add":
                out = args[0] + args[1]
            elif op == "maxpool":
                out = F.max_pool2d(args[0], node["kernel"], node["stride"], node["padding"], node["dilation"],
                                   ceil_mode=node["ceil_mode"])
            elif op == "global_avgpool":
                out = F.adaptive_avg_pool2d(args[0], 1)
            elif op == "flatten":
                out = torch.flatten(args[0], node["start_dim"])
            else:
                raise ValueError(f"unknown op '{op}' in node {node['name']}")
            values[node["name"]] = out
        return values[self.output]
