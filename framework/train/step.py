"""One training step: the protocol :func:`framework.train.engine.fit` drives, and the DeepSpeed step
of `pretrain` and `finetune`.

A step takes one batch (this rank's part of one optimizer step), updates the model and returns a
:class:`StepOutput`; its `state_dict()` is what a checkpoint keeps of it beyond the model's weights
(optimizer, schedule, two-pass state), and `load_state_dict` restores that. Implementations:

- :class:`TargetStep` (here): the target training of `pretrain` and `finetune`, through a DeepSpeed
  engine and :class:`~framework.sharpness.EngineTwoPass` (a plain step without a sharpness rule);
- :class:`framework.search.step.SearchStep`: the proxy search (weights and logits together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from framework.sharpness import EngineTwoPass
from framework.sharpness.rules import SAM

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), already on the device


@dataclass
class StepOutput:
    """What one step reports: the mean loss at the unperturbed weights (a 0-dim tensor), the outputs
    at those weights (detached, for the training accuracy) and float metrics (tracked as given)."""

    loss: torch.Tensor
    logits: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)


class TrainingStep(Protocol):
    def __call__(self, batch: Batch) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TargetStep:
    """One optimizer step of a DeepSpeed `engine` on this rank's `micro_batch x accumulation` samples.

    The batch is split into micro-batches of `micro_batch` samples; each is cast to the engine's
    precision (bf16/fp16 when enabled, the loss computed in fp32) and taken through
    :meth:`EngineTwoPass.micro_step`, which runs the two passes of `rule` (every `period`-th step;
    `rule=None`: plain steps) and lets the engine step the optimizer and the schedule at the
    accumulation boundary. The reported loss is the mean over the micro-batches of the first-pass
    cross-entropy; the outputs are those of the first forward pass of each micro-batch.

    The engine's own state (optimizer partitions, schedule) is saved and restored by
    :mod:`framework.train.deepspeed_checkpoint`; `state_dict` holds the two-pass state.
    """

    def __init__(self, engine, model: nn.Module, rule: SAM | None, micro_batch: int, period: int = 1,
                 saq_case: int | None = None):
        self.two_pass = EngineTwoPass(engine, model, rule, period=period, saq_case=saq_case)
        self.micro_batch = int(micro_batch)
        self.criterion = nn.CrossEntropyLoss()
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None

    def __call__(self, batch: Batch) -> StepOutput:
        images, labels = batch
        losses, outputs, info = [], [], {}
        for x, y in zip(images.split(self.micro_batch), labels.split(self.micro_batch), strict=True):
            x = x.to(self.dtype) if self.dtype is not None else x
            kept: list[torch.Tensor] = []

            def forward(net, x=x, y=y, kept=kept):
                out = net(x)
                if not kept:
                    kept.append(out.detach().float())
                return self.criterion(out.float(), y)

            info = self.two_pass.micro_step(forward)
            losses.append(info["loss"])
            outputs.append(kept[0])
        info = {k: v for k, v in info.items() if k != "loss"}
        return StepOutput(torch.tensor(sum(losses) / len(losses)), torch.cat(outputs), info)

    def state_dict(self) -> dict[str, Any]:
        return {"two_pass": self.two_pass.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "two_pass" in state:  # a training state without it restores the engine alone
            self.two_pass.load_state_dict(state["two_pass"])
