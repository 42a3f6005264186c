"""The factory of models (`create_model(name, num_classes=..., in_channels=...)`).

Builders (registered in :mod:`framework.models.registry`) take `num_classes`, `in_channels` and
their own keyword options and return an `nn.Module` with random weights; :func:`create_model` can
then load a local weights file (for example a torchvision ImageNet checkpoint) and adapts what does
not fit: a 3-channel first conv summed to 1 channel, a classifier head for another number of classes
left freshly initialised. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.errors import MPQError
from framework.models.registry import MODELS

log = logging.getLogger(__name__)


def _ensure_builtins() -> None:
    from framework.models import cifar_resnet, torchvision_models  # noqa: F401


def available_models() -> list[str]:
    _ensure_builtins()
    return sorted(MODELS)


def create_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model, optionally loading a local weights file (adapted, never downloaded)."""
    _ensure_builtins()
    if name not in MODELS:
        raise MPQError(f"unknown model '{name}'; registered models are: {', '.join(available_models())}")
    model = MODELS[name](num_classes=int(num_classes), in_channels=int(in_channels), **kwargs)
    if weights:
        load_adapted_weights(model, weights)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MPQError(f"model weights file {path} does not exist; set model.weights to a .pth/.pt state dict or null")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MPQError(f"model weights file {path} is not a readable torch state dict ({type(err).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MPQError(f"model weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_adapted_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load `path` into `model`, adapting the input conv and skipping shape-mismatched heads.

    A first conv stored for 3 channels loads into a 1-channel model as the sum over input channels
    (the response to a gray image replicated to RGB is unchanged). Tensors whose shapes still differ
    (typically the classifier of another number of classes) keep their fresh initialisation.
    Returns the names that were adapted and skipped; unknown names are an error.
    """
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise MPQError(
            f"model weights file {path} does not match this model: unknown tensors {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; is it a checkpoint of another architecture?"
        )
    adapted, skipped, load = [], [], {}
    for key, tensor in state.items():
        target = own[key]
        if tensor.shape == target.shape:
            load[key] = tensor
        elif tensor.dim() == 4 and tensor.shape[1] == 3 and target.shape[1] == 1 and tensor.shape[0] == target.shape[0]:
            load[key] = tensor.sum(dim=1, keepdim=True)
            adapted.append(key)
        else:
            skipped.append(key)
    model.load_state_dict(load, strict=False)
    if adapted or skipped:
        log.info("weights %s: adapted %s, kept fresh %s", path, adapted, skipped)
    return {"adapted": adapted, "skipped": skipped}
