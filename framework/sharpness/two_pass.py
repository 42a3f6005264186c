"""One two-pass mechanism for every sharpness rule (SAM, ASAM, SAQ cases 1-3, ASGA).

    pass 1:  loss = L(theta), gradients g                       (closure)
    perturb: theta + eps  (eps from the rule; where it is added depends on the SAQ case)
    pass 2:  loss_p = L(theta + eps), gradients g_p             (closure again; BN statistics frozen)
    restore: theta
    update:  grad <- rule.direction(g, g_p); base optimizer(s) step

Which tensors are perturbed: every trainable parameter except the search logits (`alpha_w`,
`alpha_a`) and weight-quantizer step sizes, i.e. conv/linear weights, biases, batch-norm affine
parameters and activation clip values (SAQ's defaults). Parameters that are not perturbed (the
logits) still take the rule's direction from their two gradients.

SAQ placement for the weights of fixed-precision layers (`saq_case`):
1. `L(Q(w) + eps(w))`: eps from the gradient of the latent weights, added after quantization;
2. `L(Q(w + eps(w)))`: added to the latent weights before quantization (a small eps rounds away);
3. `L(Q(w) + eps(Q(w)))`: eps from the gradient w.r.t. the quantized weights (kept from pass 1),
   added after quantization. Searchable layers always use case 2.

`period=k` runs the full two-pass step every k-th step and a plain step (one pass) in between;
`rule=None` makes every step a plain step, so one training loop serves every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from framework.quant.layers import QUANT_LAYERS
from framework.sharpness.rules import SAM

NEVER_PERTURBED = ("alpha_w", "alpha_a")


def _excluded(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NEVER_PERTURBED or ".weight_quant" in name or ".weight_quants" in name


class TwoPassOptimizer:
    """Wraps one or more torch optimizers; `step(closure)` runs the two passes and the update."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: Iterable[torch.optim.Optimizer],
        rule: SAM | None,
        period: int = 1,
        saq_case: int | None = None,
    ):
        self.model = model
        self.optimizers = list(optimizers)
        self.rule = rule
        self.period = max(1, int(period))
        self.saq_case = saq_case
        if saq_case not in (None, 1, 2, 3):
            raise ValueError(f"SAQ case must be 1, 2 or 3, not {saq_case}")
        self.step_count = 0
        named = dict(model.named_parameters())
        self.perturbed: list[tuple[str, nn.Parameter]] = [
            (name, p) for name, p in named.items() if p.requires_grad and not _excluded(name)
        ]
        self.post_quant_layers: dict[str, nn.Module] = {}
        if saq_case in (1, 3):
            for name, module in model.named_modules():
                if isinstance(module, QUANT_LAYERS) and module.w_bits < 32:
                    self.post_quant_layers[f"{name}.weight" if name else "weight"] = module
        self.batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # -- helpers -----------------------------------------------------------------------------
    def _all_params(self) -> list[torch.Tensor]:
        return [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _freeze_bn_stats(self, frozen: bool) -> None:
        """Pass 2 must not count as a batch for batch-norm running statistics."""
        for bn in self.batchnorms:
            if frozen:
                bn._saved_stats = (bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())  # type: ignore[attr-defined]
                bn.momentum = 0.0
            else:
                momentum, tracked = bn._saved_stats  # type: ignore[attr-defined]
                bn.momentum = momentum
                if tracked is not None:
                    bn.num_batches_tracked.copy_(tracked)

    def is_two_pass_step(self) -> bool:
        return self.rule is not None and self.step_count % self.period == 0

    # -- the step ------------------------------------------------------------------------------
    def step(
        self, closure: Callable[[], torch.Tensor], before_update: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """One optimizer step; `closure()` computes the loss, calls backward and returns the loss.

        `before_update()` runs after the update direction is in `.grad` and before the base step:
        the search adds the complexity gradient of the logits there, outside the two passes.
        """
        two_pass = self.is_two_pass_step()
        self.step_count += 1
        for layer in self.post_quant_layers.values():
            layer.keep_quantized_weight = two_pass and self.saq_case == 3
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
        first = {p: (p.grad.detach().clone() if p.grad is not None else None) for p in params}
        quantized_grads = {
            name: layer.quantized_weight.grad.detach()
            for name, layer in self.post_quant_layers.items()
            if layer.quantized_weight is not None and layer.quantized_weight.grad is not None
        }
        targets, saved = self._perturb(first, quantized_grads)

        self.zero_grad()
        self._freeze_bn_stats(True)
        try:
            loss_p = closure()
        finally:
            self._freeze_bn_stats(False)
            self._restore(targets, saved)
        with torch.no_grad():
            for p in params:
                direction = self._direction(first.get(p), p.grad, p)
                if direction is not None:
                    p.grad = direction
        self.rule.after_step(info["loss"], float(loss_p.detach()))
        if before_update is not None:
            before_update()
        for opt in self.optimizers:
            opt.step()
        info.update(loss_perturbed=float(loss_p.detach()), **self.rule.state())
        return info

    # -- the pieces both step implementations share ----------------------------------------------
    def _perturb(self, first: dict, quantized_grads: dict[str, torch.Tensor]) -> tuple[list, dict]:
        """Add the rule's perturbation (from the first-pass gradients) where the SAQ case places it.

        Returns what :meth:`_restore` needs. `quantized_grads` maps a post-quantization layer's weight
        name to the gradient w.r.t. its quantized weight (SAQ case 3's source).
        """
        sources, targets = [], []
        for name, p in self.perturbed:
            if first.get(p) is None:
                continue
            layer = self.post_quant_layers.get(name)
            source = quantized_grads.get(name) if layer is not None and self.saq_case == 3 else None
            sources.append(first[p] if source is None else source)
            targets.append((name, p, layer))
        eps = self.rule.perturbation(sources, [p for _, p, _ in targets])
        saved = {}
        with torch.no_grad():
            for (_, p, layer), e in zip(targets, eps, strict=True):
                if layer is not None:
                    layer.weight_eps = e  # after quantization (SAQ cases 1 and 3)
                else:
                    saved[p] = p.detach().clone()  # restored by copy: theta + eps - eps is not theta in floats
                    p.add_(e)
        for layer in self.post_quant_layers.values():
            layer.keep_quantized_weight = False
            layer.quantized_weight = None
        return targets, saved

    @staticmethod
    def _restore(targets: list, saved: dict) -> None:
        with torch.no_grad():
            for _, p, layer in targets:
                if layer is not None:
                    layer.weight_eps = None
                else:
                    p.copy_(saved[p])

    def _direction(self, g: torch.Tensor | None, g_p: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
        """The rule's update direction from the two passes' gradients (None if neither exists)."""
        if g is None and g_p is None:
            return None
        g = torch.zeros_like(p) if g is None else g
        g_p = torch.zeros_like(p) if g_p is None else g_p
        return self.rule.direction(g, g_p)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "rule": self.rule.state() if self.rule is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.rule is not None:
            self.rule.load_state(state["rule"])


class EngineTwoPass(TwoPassOptimizer):
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
        super().__init__(model, [], rule, period=period, saq_case=saq_case)
        self.engine = engine
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._losses: list[tuple[float, float]] = []

    def _reduce_losses(self) -> tuple[float, float]:
        from framework.dist.process_group import all_reduce_mean

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
            self.step_count += 1
            if two_pass:
                loss, loss_p = self._reduce_losses()
                self.rule.after_step(loss, loss_p)
                info.update(**self.rule.state())
        return info

    def _two_pass(self, forward: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
        for layer in self.post_quant_layers.values():
            layer.keep_quantized_weight = self.saq_case == 3
        loss = forward(self.engine.module)
        kept = [(name, layer.quantized_weight) for name, layer in self.post_quant_layers.items()
                if layer.quantized_weight is not None and layer.quantized_weight.requires_grad]
        grads = torch.autograd.grad(loss, self.params + [q for _, q in kept], allow_unused=True)
        first = dict(zip(self.params, grads[: len(self.params)], strict=True))
        quantized = {name: g for (name, _), g in zip(kept, grads[len(self.params):], strict=True) if g is not None}
        targets, saved = self._perturb(first, quantized)
        self._freeze_bn_stats(True)
        try:
            loss_p = forward(self.engine.module)
            second = torch.autograd.grad(loss_p, self.params, allow_unused=True)
        finally:
            self._freeze_bn_stats(False)
            self._restore(targets, saved)
        with torch.no_grad():
            directions = [self._direction(first[p], g_p, p) for p, g_p in zip(self.params, second, strict=True)]
        surrogate = sum((p * d).sum() for p, d in zip(self.params, directions, strict=True) if d is not None)
        self.engine.backward(surrogate)
        self._losses.append((float(loss.detach()), float(loss_p.detach())))
        return {"loss": float(loss.detach()), "loss_perturbed": float(loss_p.detach())}
