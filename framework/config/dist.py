"""`dist`: distributed pretraining and fine-tuning (processes, backend, ZeRO stage, batch split,
precision from framework.dist.engine's PRECISIONS, clipping, timeout, raw DeepSpeed keys).

That ZeRO stage 3 is refused, and that several processes are for pretrain and finetune only, are
checks across groups: framework.config.root makes them.
"""

from framework.config.types import Mapping, Schema, number, one_of, whole

BACKENDS = ("auto", "gloo", "nccl")


def _precisions() -> tuple[str, ...]:
    from framework.dist.engine import PRECISIONS

    return PRECISIONS


class DistConfig(Schema):
    """The DeepSpeed engine's settings: global batch = micro_batch x gradient_accumulation x processes."""

    nproc: whole(1)
    backend: one_of(BACKENDS)
    zero_stage: one_of((0, 1, 2, 3))
    gradient_accumulation: whole(1)
    micro_batch: whole(1) | None
    precision: one_of(_precisions)
    gradient_clipping: number(0)
    timeout_min: number(0, strict=True)
    deepspeed: Mapping
