"""Fixed and searchable layers, model conversion, and quantizer state in checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from framework.models import create_model
from framework.paths import CONF_DIR
from framework.quant import (
    QConv2d,
    QLinear,
    SearchConv2d,
    SearchLinear,
    build_supernet,
    expected_bitops,
    quantize_model,
    trace_layers,
)
from framework.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from tests.conftest import compose_config

LSQ = OmegaConf.load(CONF_DIR / "quant" / "lsq.yaml")
MINMAX = compose_config("pretrain", ["quant=minmax"]).quant  # minmax.yaml builds on lsq.yaml


class CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.conv2d):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_searchable_conv_runs_one_convolution_of_mixed_input_and_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
    layer = SearchConv2d.from_float(conv, [2, 3, 4, 6], [2, 4, 8], MINMAX)
    with torch.no_grad():
        layer.alpha_w.copy_(torch.tensor([0.3, -1.0, 0.5, 2.0]))
        layer.alpha_a.copy_(torch.tensor([1.0, 0.0, -0.5]))
    x = torch.rand(2, 4, 5, 5) * 3
    with CountConvolutions() as counter:
        y = layer(x)
    assert counter.count == 1

    pw, pa = F.softmax(layer.alpha_w, 0), F.softmax(layer.alpha_a, 0)
    x_mix = sum(pa[i] * layer.act_quants[i](x) for i in range(3))
    w_mix = sum(pw[j] * layer.weight_quants[j](layer.weight) for j in range(4))
    assert torch.allclose(y, F.conv2d(x_mix, w_mix, layer.bias, padding=1), atol=1e-6)
    # and the candidates really are different quantizations
    assert not torch.allclose(layer.weight_quants[0](layer.weight), layer.weight_quants[3](layer.weight))


def test_searchable_linear_mixes_and_gradients_reach_the_logits():
    layer = SearchLinear.from_float(torch.nn.Linear(8, 3), [2, 4], [2, 4], MINMAX)
    layer(torch.rand(5, 8)).pow(2).sum().backward()
    assert layer.alpha_w.grad is not None and layer.alpha_w.grad.abs().sum() > 0
    assert layer.alpha_a.grad is not None and layer.alpha_a.grad.abs().sum() > 0


def test_expected_bits_closed_form_and_joint_bits():
    layer = SearchConv2d.from_float(torch.nn.Conv2d(2, 2, 1), [2, 4], [2, 8], MINMAX)
    with torch.no_grad():
        layer.alpha_w.copy_(torch.tensor([0.0, 0.0]))
        layer.alpha_a.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))
    ew, ea = layer.expected_bits()
    assert ew.item() == pytest.approx(3.0) and ea.item() == pytest.approx(0.25 * 2 + 0.75 * 8)

    joint = SearchConv2d.from_float(torch.nn.Conv2d(2, 2, 1), [2, 4], [2, 4], OmegaConf.merge(MINMAX, {"joint_wa": True}))
    assert joint.alpha_a is None
    pw, pa = joint.bit_probabilities()
    assert torch.equal(pw, pa)


def test_gumbel_sampling_only_while_training():
    layer = SearchConv2d.from_float(torch.nn.Conv2d(2, 2, 1), [2, 4, 6], [2, 4, 6], OmegaConf.merge(MINMAX, {"gumbel_tau": 1.0}))
    torch.manual_seed(0)
    layer.train()
    sampled = layer._mixing_weights()[0]
    layer.eval()
    plain = layer._mixing_weights()[0]
    assert torch.allclose(plain, torch.full((3,), 1 / 3))
    assert not torch.allclose(sampled, plain)
    assert sampled.sum().item() == pytest.approx(1.0)


def test_depthwise_and_grouped_convs_quantize(tmp_path):
    model = create_model("mobilenet_v2", num_classes=10, in_channels=3).eval()
    layers = trace_layers(model, 64, 3)
    assert any(layer.groups > 1 for layer in layers)
    quantize_model(model, {layer.name: (4, 4) for layer in layers}, LSQ, layers)
    depthwise = [m for m in model.modules() if isinstance(m, QConv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_fixed_32_bits_layers_equal_the_float_model():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    conv = QConv2d.from_float(model.conv1, 32, 32, LSQ)
    assert torch.equal(conv(torch.ones(1, 1, 5, 5)), model.conv1(torch.ones(1, 1, 5, 5)))
    layers = trace_layers(model, 28, 1)
    quantize_model(model, {layer.name: (32, 32) for layer in layers}, LSQ, layers)
    assert torch.equal(model(x), ref)


def test_supernet_fixes_first_and_last_layers_and_keeps_the_traced_macs():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 28, 1)
    weight_before = model.layer2[0].conv1.weight.detach().clone()
    build_supernet(model, layers, MINMAX)
    assert isinstance(model.conv1, QConv2d) and (model.conv1.w_bits, model.conv1.a_bits) == (8, 8)
    assert isinstance(model.fc, QLinear) and model.fc.w_bits == 8
    searchable = [n for n, m in model.named_modules() if isinstance(m, (SearchConv2d, SearchLinear))]
    assert len(searchable) == len(layers) - 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert torch.equal(model.layer2[0].conv1.weight, weight_before)
    assert {layer.name: model.get_submodule(layer.name).macs for layer in layers} == {layer.name: layer.macs for layer in layers}


def test_expected_bitops_follows_the_logits():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    layers = trace_layers(model, 28, 1)
    build_supernet(model, layers, MINMAX)
    uniform = expected_bitops(model)
    fixed = sum(layer.macs * 64 for layer in layers if layer.name in ("conv1", "fc"))
    searched = sum(layer.macs for layer in layers if layer.name not in ("conv1", "fc"))
    assert uniform.item() == pytest.approx(fixed + searched * 3.75**2, rel=1e-5)  # E[b] = (2+3+4+6)/4
    for module in model.modules():
        if isinstance(module, SearchConv2d):
            with torch.no_grad():
                module.alpha_w.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    assert expected_bitops(model).item() < uniform.item()


def test_quantizer_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1).eval()
    layers = trace_layers(model, 28, 1)
    bits = {layer.name: (4, 4) for layer in layers}
    quantize_model(model, bits, LSQ, layers)
    x = torch.randn(4, 1, 28, 28)
    ref = model(x)  # initialises every LSQ step size from data
    save_checkpoint(tmp_path / "q", model, {"model": {"name": "resnet8"}})

    fresh = create_model("resnet8", num_classes=10, in_channels=1).eval()
    quantize_model(fresh, bits, LSQ, layers)
    load_model_state(fresh, load_checkpoint(tmp_path / "q"))
    assert bool(fresh.layer1[0].conv1.act_quant.initialized)
    assert torch.equal(fresh.layer1[0].conv1.act_quant.step, model.layer1[0].conv1.act_quant.step)
    assert torch.equal(fresh(x), ref)
