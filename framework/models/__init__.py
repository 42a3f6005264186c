"""Model registry: CIFAR-style ResNet-8/20 for small inputs, torchvision ResNet-18/50 and MobileNet-V2."""

from framework.models.factory import available_models, create_model, load_adapted_weights
from framework.models.registry import MODELS, register_model

__all__ = ["MODELS", "available_models", "create_model", "load_adapted_weights", "register_model"]
