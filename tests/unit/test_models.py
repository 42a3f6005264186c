"""Every registered model gives the right output shape for its channels and classes."""

import pytest
import torch

from framework.errors import MPQError
from framework.models import available_models, create_model, load_adapted_weights

SMALL = {"resnet8", "resnet20"}


def test_registry_holds_the_design_models():
    assert {"resnet8", "resnet20", "resnet18", "resnet50", "mobilenet_v2"} <= set(available_models())


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet18", "resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(name, in_channels):
    model = create_model(name, num_classes=7, in_channels=in_channels).eval()
    size = 28 if name in SMALL else 64
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)


def test_small_input_stem_keeps_resolution():
    big = create_model("resnet18", num_classes=10, in_channels=1)
    small = create_model("resnet18", num_classes=10, in_channels=1, small_input=True)
    x = torch.randn(1, 1, 32, 32)
    assert small.maxpool(small.conv1(x)).shape[-1] == 32
    assert big.maxpool(big.conv1(x)).shape[-1] == 8


def test_resnet20_depth():
    model = create_model("resnet20", num_classes=10, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 1 stem + 3 stages x 3 blocks x 2 convs; + fc = 20 weighted layers


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(MPQError, match="resnet18"):
        create_model("resnet9", num_classes=10)


def test_local_imagenet_style_weights_are_adapted(tmp_path):
    """A 3-channel 1000-class file loads into a 1-channel 10-class model: stem summed, head kept fresh."""
    source = create_model("resnet18", num_classes=1000, in_channels=3)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    target = create_model("resnet18", num_classes=10, in_channels=1)
    fresh_fc = target.fc.weight.detach().clone()
    report = load_adapted_weights(target, path)
    assert report == {"adapted": ["conv1.weight"], "skipped": ["fc.weight", "fc.bias"]}
    assert torch.allclose(target.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(target.fc.weight, fresh_fc)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r8.pth"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    with pytest.raises(MPQError, match="another architecture"):
        create_model("mobilenet_v2", num_classes=10, weights=str(path))


def test_mobilenet_v2_width_multiplier_scales_the_channels():
    narrow = create_model("mobilenet_v2", num_classes=10, in_channels=1, small_input=True, width_mult=0.5)
    full = create_model("mobilenet_v2", num_classes=10, in_channels=1, small_input=True)
    assert narrow.features[0][0].out_channels == 16 and full.features[0][0].out_channels == 32
    assert narrow.classifier[-1].in_features == 1280  # the last 1x1 is never narrowed below 1280 (Sandler et al.)
    assert sum(p.numel() for p in narrow.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())
    assert narrow(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("width", [0, -0.5])
def test_a_non_positive_width_multiplier_is_refused(width):
    with pytest.raises(ValueError, match=f"model.options.width_mult={width}"):
        create_model("mobilenet_v2", num_classes=10, width_mult=width)
