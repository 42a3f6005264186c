"""The registry of model builders: `@register_model(name)` on `fn(num_classes, in_channels, **options)`.

The builders live in their own modules (:mod:`~framework.models.cifar_resnet`,
:mod:`~framework.models.torchvision_models`), which import this one; :mod:`framework.models.factory`
imports them and builds models by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a builder `fn(num_classes, in_channels, **kwargs) -> nn.Module`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return wrap
