"""One two-pass mechanism for every sharpness rule (SAM, ASAM, SAQ cases 1-3, ASGA), on plain torch
optimizers (:class:`TwoPassOptimizer`) or on a DeepSpeed engine (:class:`EngineTwoPass`)::

    pass 1:  loss = L(theta), gradients g
    perturb: theta + eps  (eps from the rule; where it is added depends on the SAQ case)
    pass 2:  loss_p = L(theta + eps), gradients g_p             (BN statistics frozen)
    restore: theta
    update:  grad <- rule.direction(g, g_p); base optimizer step

Both hold one :class:`~framework.sharpness.perturbation.Perturbation`, which decides which tensors
move and how (see that module); they differ only in how gradients are taken and the update applied.

`period=k` runs the full two-pass step every k-th step and a plain step (one pass) in between;
`rule=None` makes every step a plain step, so one training loop serves every optimizer. The state
(`state_dict`) is the step count and the rule's state (ASGA's radius and gap EMA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from framework.dist.process_group import all_reduce_mean
from framework.sharpness.perturbation import Perturbation
from framework.sharpness.rules import SAM


@dataclass
class Cadence:
    """Two passes every `period`-th step (plain steps between; none without a rule), and the state
    a checkpoint keeps: the step count and the rule's state."""

    rule: SAM | None
    period: int = 1
    step_count: int = 0

    def __post_init__(self) -> None:
        self.period = max(1, int(self.period))

    def two_pass_now(self) -> bool:
        return self.rule is not None and self.step_count % self.period == 0

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "rule": self.rule.state() if self.rule is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.rule is not None:
            self.rule.load_state(state["rule"])


class TwoPassOptimizer:
    """Wraps one or more torch optimizers; `step(closure)` runs the two passes and the update."""

    def __init__(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], rule: SAM | None,
                 period: int = 1, saq_case: int | None = None):
        self.model, self.rule, self.saq_case = model, rule, saq_case
        self.optimizers = list(optimizers)
        self.perturbation = Perturbation(model, rule, saq_case)
        self.cadence = Cadence(rule, period)

    @property
    def perturbed(self) -> list[tuple[str, nn.Parameter]]:
        """The `(name, parameter)` pairs the second pass perturbs (assign a subset to narrow it)."""
        return self.perturbation.perturbed

    @perturbed.setter
    def perturbed(self, pairs: list[tuple[str, nn.Parameter]]) -> None:
        self.perturbation.perturbed = list(pairs)

    @property
    def step_count(self) -> int:
        return self.cadence.step_count

    def is_two_pass_step(self) -> bool:
        return self.cadence.two_pass_now()

    def state_dict(self) -> dict:
        return self.cadence.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cadence.load_state_dict(state)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor], before_update: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer step; `closure()` computes the loss, calls backward and returns the loss.

        `before_update()` runs after the update direction is in `.grad` and before the base step:
        the search adds the complexity gradient of the logits there, outside the two passes.
        """
        two_pass = self.is_two_pass_step()
        self.cadence.step_count += 1
        self.perturbation.keep_quantized_weights(two_pass)
        self.zero_grad()
        loss = closure()
        info = {"loss": float(loss.detach())}
        if not two_pass:
            if before_update is not None:
                before_update()
            for opt in self.optimizers:
                opt.step()
            return info

        params = self._all_params()
        # the first pass's gradient tensors themselves: zero_grad(set_to_none) hands them over, and
        # the second backward writes new ones
        first = {p: p.grad for p in params}
        with self.perturbation.applied(first, self.perturbation.quantized_grads()):
            self.zero_grad()
            loss_p = closure()
        with torch.no_grad():
            directions = self.perturbation.directions([first[p] for p in params], [p.grad for p in params], params)
            for p, direction in zip(params, directions, strict=True):
                if direction is not None:
                    p.grad = direction
        self.rule.after_step(info["loss"], float(loss_p.detach()))
        if before_update is not None:
            before_update()
        for opt in self.optimizers:
            opt.step()
        info.update(loss_perturbed=float(loss_p.detach()), **self.rule.state())
        return info


class EngineTwoPass:
    """The two-pass step on a DeepSpeed engine, under data parallelism (any ZeRO stage 0-2).

    Per micro-batch on each rank:

        pass 1:  g_r   = grad L_r(theta)            local: torch.autograd.grad, no all-reduce
        perturb: theta + eps_r, eps_r from g_r      (each rank its own, as in m-sharpness)
        pass 2:  g_p,r = grad L_r(theta + eps_r)    local
        restore: theta
        d_r = rule.direction(g_r, g_p,r)            SAM: g_p,r;  ASGA: (g_r + g_p,r) / 2
        engine.backward(sum_p <p, d_r>)             the engine averages d_r over ranks (and over
                                                    accumulation steps) with its own machinery
        engine.step()                               the base optimizer, at the accumulation boundary

    The surrogate `sum_p <p, d_r>` has gradient exactly `d_r`, so ZeRO's reduce-scatter (stage 2)
    or all-reduce (stages 0, 1) averages the update direction itself. Every rule here is linear in
    `(g, g_p)`, so the update is `direction(mean_r g_r, mean_r g_p,r)`: for SAM the average of the
    second-pass gradients, for ASGA the average of both passes. The losses of both passes are
    averaged over ranks and micro-batches before the rule's `after_step`, so ASGA's radius and its
    EMA are the same on every rank. Pass 1 uses autograd.grad, which fills no `.grad` and triggers
    none of ZeRO's gradient hooks.

    `forward(net)` returns the loss of `net` on the micro-batch with its graph, without calling
    backward. Plain steps pass the engine; the two passes pass `engine.module` (the full model under
    ZeRO 0-2), whose outputs carry none of the engine's backward hooks, which would refuse
    `autograd.grad`.
    """

    def __init__(self, engine, model: nn.Module, rule: SAM | None, period: int = 1, saq_case: int | None = None):
        self.model, self.rule, self.saq_case = model, rule, saq_case
        self.perturbation = Perturbation(model, rule, saq_case)
        self.cadence = Cadence(rule, period)
        self.engine = engine
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._losses: list[tuple[float, float]] = []

    @property
    def step_count(self) -> int:
        return self.cadence.step_count

    def is_two_pass_step(self) -> bool:
        return self.cadence.two_pass_now()

    def state_dict(self) -> dict:
        return self.cadence.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cadence.load_state_dict(state)

    def _reduce_losses(self) -> tuple[float, float]:
        n = len(self._losses)
        loss, loss_p = all_reduce_mean([sum(a for a, _ in self._losses) / n, sum(b for _, b in self._losses) / n])
        self._losses.clear()
        return loss, loss_p

    def micro_step(self, forward: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
        """One micro-batch; the engine steps the optimizer at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        two_pass = self.is_two_pass_step()
        info: dict[str, float]
        if not two_pass:
            loss = forward(self.engine)
            self.engine.backward(loss)
            info = {"loss": float(loss.detach())}
        else:
            info = self._two_pass(forward)
        self.engine.step()
        if boundary:
            self.cadence.step_count += 1
            if two_pass:
                loss, loss_p = self._reduce_losses()
                self.rule.after_step(loss, loss_p)
                info.update(**self.rule.state())
        return info

    def _two_pass(self, forward: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
        perturbation = self.perturbation
        perturbation.keep_quantized_weights(True)
        loss = forward(self.engine.module)
        kept = perturbation.kept_quantized_weights()
        grads = torch.autograd.grad(loss, self.params + [q for _, q in kept], allow_unused=True)
        first = dict(zip(self.params, grads[: len(self.params)], strict=True))
        quantized = {name: g for (name, _), g in zip(kept, grads[len(self.params):], strict=True) if g is not None}
        with perturbation.applied(first, quantized):
            loss_p = forward(self.engine.module)
            second = torch.autograd.grad(loss_p, self.params, allow_unused=True)
        with torch.no_grad():
            directions = perturbation.directions([first[p] for p in self.params], list(second), self.params)
        surrogate = sum((p * d).sum() for p, d in zip(self.params, directions, strict=True) if d is not None)
        self.engine.backward(surrogate)
        self._losses.append((float(loss.detach()), float(loss_p.detach())))
        return {"loss": float(loss.detach()), "loss_perturbed": float(loss_p.detach())}
