"""Quantizers, fixed-policy and searchable layers, model conversion and the cost model."""

from framework.quant.convert import (
    build_supernet,
    fixed_bits_of,
    fixed_layer_names,
    quantize_model,
)
from framework.quant.cost import (
    LayerCost,
    complexity_penalty,
    expected_bitops,
    float_parameter_count,
    policy_cost,
    trace_layers,
)
from framework.quant.layers import QConv2d, QLinear, SearchConv2d, SearchLinear
from framework.quant.quantizers import (
    FULL_PRECISION,
    SUPPORTED_BITS,
    LearnedRangeActQuantizer,
    LSQQuantizer,
    MinMaxWeightQuantizer,
)

__all__ = [
    "FULL_PRECISION",
    "SUPPORTED_BITS",
    "LSQQuantizer",
    "LayerCost",
    "LearnedRangeActQuantizer",
    "MinMaxWeightQuantizer",
    "QConv2d",
    "QLinear",
    "SearchConv2d",
    "SearchLinear",
    "build_supernet",
    "complexity_penalty",
    "expected_bitops",
    "fixed_bits_of",
    "fixed_layer_names",
    "float_parameter_count",
    "policy_cost",
    "quantize_model",
    "trace_layers",
]
