"""The cost model against published counts and closed forms."""

import pytest
import torch
from torch import nn

from framework.models import create_model
from framework.quant import complexity_penalty, float_parameter_count, policy_cost, trace_layers


def _uniform(layers, w, a):
    return {layer.name: (w, a) for layer in layers}


def test_resnet18_at_224_matches_published_macs_and_bitops():
    model = create_model("resnet18", num_classes=1000, in_channels=3)
    layers = trace_layers(model, 224, 3)
    cost = policy_cost(layers, _uniform(layers, 8, 8), float_parameter_count(model))
    assert cost["gmacs"] == pytest.approx(1.82, rel=0.01)          # torchvision / He et al.
    assert cost["gbitops"] == pytest.approx(116.0, rel=0.01)       # HAWQ-V3's INT8 ResNet-18
    cost4 = policy_cost(layers, _uniform(layers, 4, 4), float_parameter_count(model))
    assert cost4["gbitops"] == pytest.approx(29.0, rel=0.01)
    assert len(layers) == 21  # 20 convs (3 downsample) + fc


def test_mobilenet_v2_at_224_matches_published_macs():
    model = create_model("mobilenet_v2", num_classes=1000, in_channels=3)
    layers = trace_layers(model, 224, 3)
    assert sum(layer.macs for layer in layers) / 1e9 == pytest.approx(0.30, rel=0.03)  # Sandler et al.: 300M


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.dw(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_closed_form_macs_bitops_and_size():
    model = Tiny()
    layers = trace_layers(model, 8, 3)
    assert [layer.name for layer in layers] == ["conv", "dw", "fc"]
    macs = {layer.name: layer.macs for layer in layers}
    assert macs == {"conv": 8 * 8 * 4 * 3 * 9, "dw": 4 * 4 * 4 * 1 * 9, "fc": 4 * 2}
    bits = {"conv": (8, 8), "dw": (2, 4), "fc": (4, 6)}
    cost = policy_cost(layers, bits, float_parameter_count(model))
    assert cost["bitops"] == 6912 * 64 + 576 * 8 + 8 * 24
    # weights at their bits; conv bias (4), BN affine (8) and fc bias (2) at 32 bits
    size_bits = 108 * 8 + 36 * 2 + 8 * 4 + (4 + 8 + 2) * 32
    assert cost["size_mb"] == pytest.approx(size_bits / 8 / 1e6)


def test_macs_scale_with_resolution():
    model = create_model("resnet20", num_classes=10, in_channels=3)
    small, big = trace_layers(model, 16, 3), trace_layers(model, 32, 3)
    convs = [(s.macs, b.macs) for s, b in zip(small, big, strict=True) if s.kind == "conv"]
    assert all(b == 4 * s for s, b in convs)


def test_complexity_penalties():
    c = torch.tensor(30.0, requires_grad=True)
    assert complexity_penalty(c, "linear", 60.0).item() == pytest.approx(0.5)
    assert complexity_penalty(c, "hinge", 60.0).item() == 0.0
    assert complexity_penalty(c, "hinge", 20.0).item() == pytest.approx(0.25)
    complexity_penalty(c, "hinge", 20.0).backward()
    assert c.grad.item() == pytest.approx(2 * 0.5 / 20.0)
    with pytest.raises(ValueError):
        complexity_penalty(c, "cubic", 1.0)
