"""`finetune`: quantization-aware fine-tuning under a fixed policy (schedule, optimizer, sharpness rule)."""

from framework.config.sharpness import FinetuneSharpnessConfig
from framework.config.train import OptimConfig
from framework.config.types import Schema, whole


class FinetuneConfig(Schema):
    """Fine-tuning's schedule, batches (global batch, see `dist`), optimizer and two-pass rule."""

    epochs: whole(1)
    max_steps: whole(1) | None
    batch_size: whole(1)
    val_every: whole(1)
    optim: OptimConfig
    sharpness: FinetuneSharpnessConfig
