"""`model.onnx`: the exported network as ONNX QDQ, built node by node with `onnx.helper`.

`torch.onnx.export` refuses fake-quantization ranges other than int8/uint8 ones, so the graph is
written directly from the :class:`ExportGraph`:

- a quantized weight is an integer initializer (its codes) feeding `DequantizeLinear(axis=0)` with
  one scale per output channel (batch norm folded in, so a scale may be negative) and zero points 0;
- a quantized input is `QuantizeLinear -> DequantizeLinear` in front of the layer ("QDQ"); where
  the layer's integer range is not a whole ONNX type's, the codes travel in an int8/uint8 container
  with a `Clip` to the range between the two ("QCDQ");
- the integer types follow the bit-width and the opset: int2/uint2 for 2-bit grids from opset 25,
  int4/uint4 for 3-4-bit weights and 4-bit grids from opset 21, int8/uint8 otherwise (opset 13:
  int8/uint8 containers only). An activation grid uses the narrow type only when its range is the
  type's whole range (LSQ's [-8, 7] or [0, 15]); others (PACT's symmetric [-7, 7], 3 bits) use Clip;
- conv -> Conv, linear -> Gemm(transB=1), each followed by an `Add` of its float bias, relu -> Relu,
  clip -> Clip, add -> Add, maxpool -> MaxPool, global_avgpool -> GlobalAveragePool,
  flatten -> Flatten(axis=1). The bias is not the Conv's own input because onnxruntime (1.32, from
  its basic optimisation level) quantizes such a float bias to int32 at the scale `s_x * s_w`,
  rounding it by up to half an output step (benchmarks/onnx_bias.py measures what that does).

The IR version is the smallest the opset needs (`onnx.helper.find_min_ir_version_for`), since
`make_model` stamps the newest, which older onnxruntime releases reject.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from framework.errors import MPQError
from framework.export.graph import ActivationGrid, ExportGraph, IntegerLayer
from framework.export.packing import pack_codes

OPSETS = (13, 21, 25)
INPUT, OUTPUT = "input", "logits"


def _types(opset: int) -> dict[tuple[bool, int], tuple[int, int, int]]:
    """(signed, width) -> (ONNX data type, qmin, qmax) of the integer types the opset has."""
    from onnx import TensorProto as T

    table = {(True, 8): (T.INT8, -128, 127), (False, 8): (T.UINT8, 0, 255)}
    if opset >= 21:
        table.update({(True, 4): (T.INT4, -8, 7), (False, 4): (T.UINT4, 0, 15)})
    if opset >= 25:
        table.update({(True, 2): (T.INT2, -2, 1), (False, 2): (T.UINT2, 0, 3)})
    return table


def weight_type(bits: int, opset: int) -> tuple[int, int]:
    """(ONNX data type, bits per stored element) of a `bits`-bit signed weight's codes."""
    types = _types(opset)
    for width in (2, 4, 8):
        if bits <= width and (True, width) in types:
            return types[(True, width)][0], width
    raise MPQError(f"no ONNX integer type holds {bits}-bit weights")


def activation_type(grid: ActivationGrid, opset: int, narrow: bool = True) -> tuple[int, int, bool]:
    """(ONNX data type, width, needs a Clip) of an activation grid: the narrow type whose whole range
    is the grid's (when `narrow`), else the 8-bit container with a Clip."""
    types = _types(opset)
    for width in (2, 4) if narrow else ():
        entry = types.get((grid.signed, width))
        if entry and (entry[1], entry[2]) == (grid.qmin, grid.qmax):
            return entry[0], width, False
    code, low, high = types[(grid.signed, 8)]
    return code, 8, (low, high) != (grid.qmin, grid.qmax)


def _int_tensor(name: str, data_type: int, width: int, values: np.ndarray, signed: bool):
    """An integer initializer of `values`, packed as ONNX packs 2/4-bit types (first element lowest)."""
    from onnx import helper

    values = np.asarray(values)
    if width == 8:
        raw = values.astype(np.int8 if signed else np.uint8).tobytes()
    else:
        raw = pack_codes(values.astype(np.int64), width, signed).tobytes()
    return helper.make_tensor(name, data_type, list(values.shape), raw, raw=True)


class _OnnxBuilder:
    def __init__(self, opset: int, bias: str = "add"):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper, self.opset, self.bias = helper, numpy_helper, opset, bias
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def quantized_input(self, layer: IntegerLayer, source: str, after_clip: bool) -> str:
        grid, prefix = layer.input, f"{layer.name}.input"
        # onnxruntime 1.32's ClipQuantFusion (on from the basic level) fails to create the session on a
        # float Clip (ReLU6) feeding a 2/4-bit QuantizeLinear: such inputs travel in the 8-bit container
        data_type, width, clip = activation_type(grid, self.opset, narrow=not after_clip)
        scale = self.const(f"{prefix}.scale", np.array(grid.scale, dtype=np.float32))
        zero = f"{prefix}.zero_point"
        self.initializers.append(_int_tensor(zero, data_type, width, np.zeros((), np.int64), grid.signed))
        codes = self.node("QuantizeLinear", [source, scale, zero], f"{prefix}.q")
        if clip:
            low, high = f"{prefix}.qmin", f"{prefix}.qmax"
            self.initializers += [_int_tensor(low, data_type, 8, np.array(grid.qmin), grid.signed),
                                  _int_tensor(high, data_type, 8, np.array(grid.qmax), grid.signed)]
            codes = self.node("Clip", [codes, low, high], f"{prefix}.q_clipped")
        return self.node("DequantizeLinear", [codes, scale, zero], f"{prefix}.dq")

    def weight(self, layer: IntegerLayer) -> str:
        if not layer.quantized_weight:
            return self.const(f"{layer.name}.weight", layer.weight.astype(np.float32))
        data_type, width = weight_type(layer.w_bits, self.opset)
        codes, zero = f"{layer.name}.weight.codes", f"{layer.name}.weight.zero_point"
        self.initializers += [_int_tensor(codes, data_type, width, layer.codes, True),
                              _int_tensor(zero, data_type, width, np.zeros(layer.out_channels, np.int64), True)]
        scale = self.const(f"{layer.name}.weight.scale", layer.weight_scale.astype(np.float32))
        return self.node("DequantizeLinear", [codes, scale, zero], f"{layer.name}.weight.dq", axis=0)

    def layer(self, node: dict[str, Any], layer: IntegerLayer, source: str, after_clip: bool) -> str:
        x = self.quantized_input(layer, source, after_clip) if layer.input is not None else source
        inputs = [x, self.weight(layer)]
        if layer.bias is not None and self.bias == "node":  # the bias as the Conv/Gemm's third input
            inputs.append(self.const(f"{layer.name}.bias", layer.bias.astype(np.float32)))
        separate = layer.bias is not None and self.bias == "add"
        out = f"{node['name']}.no_bias" if separate else node["name"]
        if layer.kind == "linear":
            out = self.node("Gemm", inputs, out, transB=1)
        else:
            a = layer.attrs
            out = self.node("Conv", inputs, out, strides=a["stride"], pads=list(a["padding"]) * 2,
                            dilations=a["dilation"], group=a["groups"], kernel_shape=list(layer.shape[2:]))
        if not separate:
            return out
        shape = (-1, 1, 1) if layer.kind == "conv" else (-1,)
        bias = self.const(f"{layer.name}.bias", layer.bias.astype(np.float32).reshape(shape))
        return self.node("Add", [out, bias], node["name"])

    def op(self, node: dict[str, Any], graph: ExportGraph, names: dict[str, str], ops: dict[str, str]) -> str:
        op, args, out = node["op"], [names[i] for i in node["inputs"]], node["name"]
        if op in ("conv", "linear"):
            return self.layer(node, graph.layers[node["layer"]], args[0], ops[node["inputs"][0]] == "clip")
        if op == "relu":
            return self.node("Relu", args, out)
        if op == "clip":
            low = self.const(f"{out}.min", np.array(node["min"], dtype=np.float32))
            high = self.const(f"{out}.max", np.array(node["max"], dtype=np.float32))
            return self.node("Clip", [args[0], low, high], out)
        if op == "add":
            return self.node("Add", args, out)
        if op == "maxpool":
            return self.node("MaxPool", args, out, kernel_shape=node["kernel"], strides=node["stride"],
                             pads=list(node["padding"]) * 2, dilations=node["dilation"], ceil_mode=int(node["ceil_mode"]))
        if op == "global_avgpool":
            return self.node("GlobalAveragePool", args, out)
        if op == "flatten":
            if node["start_dim"] != 1:
                raise MPQError(f"cannot export '{out}' to ONNX: flatten from dimension {node['start_dim']} (1 is supported)")
            return self.node("Flatten", args, out, axis=1)
        raise MPQError(f"cannot export '{out}' to ONNX: op '{op}'")


def _check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise MPQError(f"export.opset={opset} is not supported; choose one of {', '.join(map(str, OPSETS))} "
                       "(13: int8/uint8 containers only, 21: int4/uint4 too, 25: int2/uint2 too)")


def _assemble(builder: _OnnxBuilder, name: str, output: str, input_shape: list, output_shape: list,
              metadata: dict[str, Any]):
    """The checked ModelProto of the builder's nodes: `input` -> ... -> `output`, renamed `logits`."""
    import onnx
    from onnx import TensorProto, helper

    builder.nodes.append(helper.make_node("Identity", [output], [OUTPUT], name=OUTPUT))
    onnx_graph = helper.make_graph(builder.nodes, name,
                                   [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, input_shape)],
                                   [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, output_shape)],
                                   builder.initializers)
    opsets = [helper.make_opsetid("", builder.opset)]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="mpq export",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise MPQError(f"the ONNX graph fails onnx.checker at opset {builder.opset} ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model


def build_onnx(graph: ExportGraph, opset: int, input_spec: dict[str, Any], metadata: dict[str, Any],
               bias: str = "add"):
    """The ONNX model of `graph` at `opset` (13, 21 or 25), checked by `onnx.checker` (full check).

    `input_spec` gives the channels and size of the input (the batch is dynamic); `metadata`
    (model, policy, input) goes into the model's metadata_props as JSON strings. `bias`: "add" (a
    float `Add` after the Conv/Gemm, what `mpq export` writes) or "node" (the Conv/Gemm's own bias
    input, which onnxruntime's optimisations quantize to int32: benchmarks/onnx_bias.py)."""
    _check_opset(opset)
    if bias not in ("add", "node"):
        raise ValueError(f"bias={bias!r}: choose add or node")
    builder = _OnnxBuilder(opset, bias)
    names: dict[str, str] = {}
    ops = {node["name"]: node["op"] for node in graph.nodes}
    for node in graph.nodes:
        names[node["name"]] = INPUT if node["op"] == "input" else builder.op(node, graph, names, ops)
    channels, size = int(input_spec["channels"]), int(input_spec["size"])
    name = f"mpq_{metadata.get('model', {}).get('name', 'model')}"
    return _assemble(builder, name, names[graph.output], ["batch", channels, size, size],
                     ["batch", graph.last_layer().out_channels], metadata)


def layer_onnx(layer: IntegerLayer, input_shape: tuple[int, ...], opset: int, after_clip: bool = False):
    """One integer layer alone as an ONNX model (input quantization, weights, op, bias), written as
    :func:`build_onnx` writes it: the parity check feeds it the framework's own input of the layer."""
    _check_opset(opset)
    builder = _OnnxBuilder(opset)
    node = {"name": "layer_output", "op": layer.kind, "inputs": [INPUT], "layer": layer.name}
    output = builder.layer(node, layer, INPUT, after_clip)
    out_shape = ["batch", layer.out_channels] + (["h", "w"] if layer.kind == "conv" else [])
    return _assemble(builder, f"mpq_layer_{layer.name}", output, ["batch", *input_shape[1:]], out_shape, {})
