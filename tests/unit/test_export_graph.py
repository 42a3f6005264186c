"""The export's pieces on a small network: batch-norm folding, the codes and scales, the packed file,
the ONNX integer types, and the parity check's power to catch a wrong layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.errors import MPQError
from framework.export import export_graph, load_packed, read_packed, save_packed
from framework.export.onnx_model import build_onnx
from framework.export.parity import compare_layers, failures
from framework.export.runtime import IntegerModel
from framework.paths import CONF_DIR
from framework.quant import quantize_model, trace_layers

LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")


class Small(nn.Module):
    """conv-BN-ReLU, a depthwise conv-BN-ReLU6, global pooling, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def quantized_small(bits=None, **quant):
    torch.manual_seed(0)
    model = Small()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        model.bn2.weight[::2] *= -1  # negative gammas fold into negative scales
    qcfg = OmegaConf.merge(LSQ, quant)
    layers = trace_layers(model, 8, 3)
    quantize_model(model, bits or {"conv1": (8, 8), "conv2": (3, 4), "fc": (2, 3)}, qcfg, layers)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8))  # initialises the step sizes
    return model.eval()


def test_batch_norm_folds_into_the_scales_and_bias_and_keeps_the_codes():
    model = quantized_small()
    graph = export_graph(model)
    assert [node["op"] for node in graph.nodes] == ["input", "conv", "relu", "conv", "clip", "global_avgpool",
                                                    "flatten", "linear"]
    conv2 = graph.layers["conv2"]
    assert conv2.folded_bn == "bn2"
    # the codes are the framework's own, untouched by the fold
    framework_codes = torch.round(model.conv2.weight / model.conv2.weight_quant.step).clamp(-4, 3)
    np.testing.assert_array_equal(conv2.codes, framework_codes.to(torch.int8).numpy())
    # a per-tensor step became per channel, negative where gamma is
    gamma = model.bn2.weight.detach().numpy()
    assert conv2.weight_scale.shape == (8,)
    np.testing.assert_array_equal(np.sign(conv2.weight_scale), np.sign(gamma))

    # folded (the integer model) against unfolded (conv then batch norm in the framework), on each layer
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        unfolded = model.bn2(model.conv2(model.relu(model.bn1(model.conv1(x)))))
        integer = IntegerModel(graph).eval()
        codes_in = integer.integer_layers[0](x)
        folded = integer.integer_layers[1](torch.relu(codes_in))
    step = float(conv2.input.scale) * np.abs(conv2.weight_scale)
    in_steps = (folded - unfolded).abs().numpy() / step.reshape(1, -1, 1, 1)
    assert in_steps.max() < 0.01
    # and the whole network gives the framework's logits
    with torch.no_grad():
        assert torch.allclose(integer(x).float(), model(x), atol=1e-5)


def test_the_packed_file_alone_rebuilds_the_model(tmp_path):
    model = quantized_small(per_channel=True)
    graph = export_graph(model)
    path = save_packed(tmp_path / "model.safetensors", graph, {"name": "small"}, {"size": 8, "channels": 3}, None)
    packed = read_packed(path)
    for name, layer in graph.layers.items():
        np.testing.assert_array_equal(packed.graph.layers[name].codes, layer.codes)
        np.testing.assert_array_equal(packed.graph.layers[name].weight_scale, layer.weight_scale)
    # 8*3*3*3 weights at 8 bits, 8*1*3*3 at 3 bits, 4*8 at 2 bits
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        sizes = {key: handle.get_tensor(key).nbytes for key in handle.keys() if key.endswith(".packed")}
    assert sizes == {"conv1.weight.packed": 216, "conv2.weight.packed": 27, "fc.weight.packed": 8}
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), IntegerModel(graph).eval()(x))


def test_a_flipped_bit_in_the_weights_is_a_clear_error(tmp_path):
    graph = export_graph(quantized_small())
    path = save_packed(tmp_path / "model.safetensors", graph, {"name": "small"}, {"size": 8, "channels": 3}, None)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(MPQError, match="corrupt or truncated.*SHA-256"):
        read_packed(path)


def test_min_max_weights_and_learned_range_inputs_export():
    model = quantized_small(weight="minmax", activation="learned_range")
    graph = export_graph(model)
    conv2 = graph.layers["conv2"]
    assert (conv2.input.qmin, conv2.input.qmax) == (0, 15)  # PACT on [0, r] at 4 bits
    assert (conv2.w_qmin, conv2.w_qmax) == (-3, 3)  # min-max: symmetric, max|W| / (2^(b-1) - 1)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(IntegerModel(graph).eval()(x).float(), model(x), atol=1e-5)


def _initializer_types(model) -> dict[str, int]:
    return {init.name: init.data_type for init in model.graph.initializer}


@pytest.mark.parametrize("opset, weight_2bit, weight_3bit, input_4bit", [
    (13, onnx.TensorProto.INT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT8),
    (21, onnx.TensorProto.INT4, onnx.TensorProto.INT4, onnx.TensorProto.UINT4),
    (25, onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.UINT4),
])
def test_onnx_integer_types_follow_the_bits_and_the_opset(opset, weight_2bit, weight_3bit, input_4bit):
    graph = export_graph(quantized_small())
    model = build_onnx(graph, opset, {"size": 8, "channels": 3}, {})
    types = _initializer_types(model)
    assert types["fc.weight.codes"] == weight_2bit
    assert types["conv2.weight.codes"] == weight_3bit
    # conv2's 4-bit input (LSQ, after a ReLU: [0, 15]) is a whole uint4 from opset 21, clipped uint8 before
    assert types["conv2.input.zero_point"] == input_4bit
    clipped = any(node.op_type == "Clip" and node.input[0] == "conv2.input.q" for node in model.graph.node)
    assert clipped == (opset == 13)
    # fc's 3-bit input [0, 7] has no type of its own: the uint8 container and a Clip
    assert types["fc.input.zero_point"] == onnx.TensorProto.UINT8
    assert any(node.op_type == "Clip" and node.input[0] == "fc.input.q" for node in model.graph.node)
    assert model.ir_version == onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def test_the_layer_check_catches_a_layer_that_computes_something_else():
    model = quantized_small()
    graph = export_graph(model)
    images = torch.randn(8, 3, 8, 8)
    report = compare_layers(model, graph, IntegerModel(graph).eval(), images, 21)
    assert failures({}, report, 0.999) == []
    assert all(row["packed_tolerance_used"] <= 1 for row in report["layers"].values() if row["unit"] == "steps")
    graph.layers["conv2"].bias = graph.layers["conv2"].bias + 0.05  # a wrong fold of one layer's bias
    broken = compare_layers(model, graph, IntegerModel(graph).eval(), images, 21)
    problems = failures({}, broken, 0.999)
    assert problems and all("layer 'conv2'" in problem for problem in problems)


def test_end_to_end_flips_pass_only_within_float32_noise():
    """onnxruntime under min_agreement passes when float32 rounding explains its flips, not otherwise."""
    def report(agreement, flips_beyond_noise):
        return {"images": 500, "framework": {"agreement_exact": 1.0},
                "packed": {"agreement": 1.0, "agreement_exact": 1.0},
                "onnx_off": {"agreement": agreement, "agreement_exact": agreement, "flips_beyond_noise": flips_beyond_noise}}

    no_layers = {"layers": {}}
    assert failures(report(1.0, 0), no_layers, 0.999) == []
    assert failures(report(0.994, 3), no_layers, 0.999) == []  # three images: the allowance, exactly
    assert failures(report(0.992, 0), no_layers, 0.999) == []  # four flips, each within the noise
    assert failures(report(0.986, 0), no_layers, 0.999) == []  # seven flips, each within the noise
    assert len(failures(report(0.992, 4), no_layers, 0.999)) == 1  # four flips beyond the allowance and the noise
    (problem,) = failures(report(0.986, 1), no_layers, 0.999)  # one flip float32 cannot explain
    assert problem.startswith("onnx_off agrees with the framework on 98.60%") and "1 of its flips" in problem


class WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_an_unsupported_layer_is_one_error_naming_it():
    with pytest.raises(MPQError, match=r"cannot export layer 'act' \(GELU\): supported are"):
        export_graph(WithGelu())


def test_batch_norm_that_does_not_follow_a_conv_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(MPQError, match=r"cannot export layer '0' \(a BatchNorm2d that does not directly follow"):
        export_graph(model)
