"""Model conversion: float model -> fixed-policy quantized model, float model -> search supernet.

Layers are addressed by module name (`layer1.0.conv1`). The first convolution and the last linear
layer in execution order are *fixed* (not searched) at `quant.fixed_bits` (8 by default, as LIMPQ;
32 keeps them in full precision; null searches them like the rest).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from framework.quant.cost import LayerCost
from framework.quant.layers import QConv2d, QLinear, SearchConv2d, SearchLinear
from framework.quant.quantizers import FULL_PRECISION


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fixed_bits_of(qcfg) -> int | None:
    """`quant.fixed_bits`: a bit-width (8, 32, ...), or None/"searched" (the first and last layers are searched)."""
    value = qcfg.fixed_bits
    if value is None or str(value).lower() in ("searched", "none", "null"):
        return None
    return int(value)


def fixed_layer_names(layers: list[LayerCost], fixed_bits) -> set[str]:
    """The first conv and last linear layer (execution order) when their bits are fixed, else none."""
    if fixed_bits is None or str(fixed_bits).lower() in ("searched", "none", "null"):
        return set()
    names = set()
    convs = [layer.name for layer in layers if layer.kind == "conv"]
    linears = [layer.name for layer in layers if layer.kind == "linear"]
    if convs:
        names.add(convs[0])
    if linears:
        names.add(linears[-1])
    return names


def _to_fixed(module: nn.Module, w_bits: int, a_bits: int, qcfg) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return QConv2d.from_float(module, w_bits, a_bits, qcfg)
    if isinstance(module, nn.Linear):
        return QLinear.from_float(module, w_bits, a_bits, qcfg)
    raise TypeError(f"{type(module).__name__} is not a conv or linear layer")


def quantize_model(
    model: nn.Module, bits: Mapping[str, tuple[int, int]], qcfg, layers: list[LayerCost] | None = None
) -> nn.Module:
    """Replace every layer named in `bits` by its fixed-precision version (in place; returns `model`).

    A layer at 32/32 bits stays the float module. `layers` (from a trace) sets each layer's `macs`.
    """
    macs = {layer.name: layer.macs for layer in layers or []}
    for name, (w_bits, a_bits) in bits.items():
        module = model.get_submodule(name)
        if int(w_bits) == FULL_PRECISION and int(a_bits) == FULL_PRECISION:
            continue
        new = _to_fixed(module, int(w_bits), int(a_bits), qcfg)
        new.macs = float(macs.get(name, 0))
        replace_module(model, name, new)
    return model


def build_supernet(model: nn.Module, layers: list[LayerCost], qcfg) -> nn.Module:
    """Turn every traced layer into a searchable one, except the fixed first/last layers (in place)."""
    fixed_bits = fixed_bits_of(qcfg)
    fixed = fixed_layer_names(layers, fixed_bits)
    for layer in layers:
        module = model.get_submodule(layer.name)
        if layer.name in fixed and fixed_bits == FULL_PRECISION:
            new = module  # kept in full precision; counted at 32/32 bits by the cost model
            new.mpq_fixed_bits = (FULL_PRECISION, FULL_PRECISION)
        elif layer.name in fixed:
            new = _to_fixed(module, fixed_bits, fixed_bits, qcfg)
        elif isinstance(module, nn.Conv2d):
            new = SearchConv2d.from_float(module, qcfg.candidates_w, qcfg.candidates_a, qcfg)
        else:
            new = SearchLinear.from_float(module, qcfg.candidates_w, qcfg.candidates_a, qcfg)
        new.macs = float(layer.macs)
        replace_module(model, layer.name, new)
    return model
