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
        # what is perturbed and which gradient defines its perturbation
        sources, targets = [], []
        for name, p in self.perturbed:
            if first.get(p) is None:
                continue
            layer = self.post_quant_layers.get(name)
            if layer is not None and self.saq_case == 3 and layer.quantized_weight is not None and layer.quantized_weight.grad is not None:
                sources.append(layer.quantized_weight.grad.detach())
            else:
                sources.append(first[p])
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

        self.zero_grad()
        self._freeze_bn_stats(True)
        try:
            loss_p = closure()
        finally:
            self._freeze_bn_stats(False)
            with torch.no_grad():
                for _, p, layer in targets:
                    if layer is not None:
                        layer.weight_eps = None
                    else:
                        p.copy_(saved[p])
        with torch.no_grad():
            for p in params:
                g, g_p = first.get(p), p.grad
                if g is None and g_p is None:
                    continue
                g = torch.zeros_like(p) if g is None else g
                g_p = torch.zeros_like(p) if g_p is None else g_p
                p.grad = self.rule.direction(g, g_p)
        self.rule.after_step(info["loss"], float(loss_p.detach()))
        if before_update is not None:
            before_update()
        for opt in self.optimizers:
            opt.step()
        info.update(loss_perturbed=float(loss_p.detach()), **self.rule.state())
        return info

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "rule": self.rule.state() if self.rule is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.rule is not None:
            self.rule.load_state(state["rule"])
