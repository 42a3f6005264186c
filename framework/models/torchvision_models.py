"""torchvision's ImageNet models, built with `weights=None` and adapted to channels and classes.

`small_input=True` swaps a ResNet's 7x7/2 stem and max-pool for a 3x3/1 stem (and a MobileNet-V2's
first stride for 1), the usual change for 28-32 pixel inputs; leave it off for ImageNet-sized inputs
so MACs and accuracy match the published models. MobileNet-V2's `width_mult` scales every layer's
channels (rounded to multiples of 8, Sandler et al. 2018); 1.0 is the published network.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tv

from framework.models.registry import register_model


def _resnet(builder, num_classes: int, in_channels: int, small_input: bool) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    return _resnet(tv.resnet18, num_classes, in_channels, small_input)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    return _resnet(tv.resnet50, num_classes, in_channels, small_input)


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 width_mult: float = 1.0) -> nn.Module:
    if not width_mult > 0:
        raise ValueError(f"model.options.width_mult={width_mult}: a MobileNet-V2 width multiplier is positive (e.g. 0.5, 1.0)")
    model = tv.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=float(width_mult))
    first = model.features[0][0]
    if in_channels != 3 or small_input:
        model.features[0][0] = nn.Conv2d(
            in_channels, first.out_channels, 3, stride=1 if small_input else 2, padding=1, bias=False
        )
    return model
