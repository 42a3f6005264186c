"""`train` (full-precision training) and the optimizer node it shares with `finetune`.

Checks the schedule (epochs, steps, batches, validation period >= 1), the optimizer name (sgd or
adamw), learning rate and weight decay >= 0, warm-up and final-LR fractions in [0, 1], momentum
and AdamW's betas in [0, 1).
"""

from pydantic import field_validator

from framework.config.types import Flag, Schema, between, invalid, number, one_of, whole

OPTIMIZERS = ("sgd", "adamw")


class OptimConfig(Schema):
    """`<stage>.optim`: the torch optimizer and its cosine schedule with warm-up."""

    name: one_of(OPTIMIZERS)
    lr: number(0)
    momentum: between(0, 1)
    nesterov: Flag
    weight_decay: number(0)
    betas: list
    warmup_fraction: between(0, 1)
    min_lr_ratio: between(0, 1)

    @field_validator("betas", mode="plain")
    @classmethod
    def _betas(cls, value):
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)):
            raise invalid("expected two numbers in [0, 1) (AdamW's beta1, beta2)")
        return value


class TrainConfig(Schema):
    """`train`: pretraining's schedule, batches and optimizer."""

    epochs: whole(1)
    max_steps: whole(1) | None
    batch_size: whole(1)
    eval_batch_size: whole(1)
    val_every: whole(1)
    optim: OptimConfig
