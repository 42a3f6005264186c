"""Model registry: CIFAR-style ResNet-8/20 for small inputs, torchvision ResNet-18/50 and MobileNet-V2."""

from framework.models.registry import MODELS, available_models, create_model, register_model

__all__ = ["MODELS", "available_models", "create_model", "register_model"]
