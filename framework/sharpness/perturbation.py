"""The perturbation both two-pass optimizers hold: what moves between the passes, and how.

For a sharpness rule (SAM, ASAM, SAQ, ASGA), the second pass evaluates the loss at a perturbed
point and the update follows the rule's direction::

    eps     = rule.perturbation(g, theta)          g: first-pass gradients of the perturbed tensors
    loss_p  = L(theta + eps)                       BN running statistics frozen
    update  = rule.direction(g, g_p)               for every trained tensor (perturbed or not)

Which tensors are perturbed: every trainable parameter except the search logits (`alpha_w`,
`alpha_a`), the weight quantizers' step sizes and the LSQ step sizes of activations (any
parameter named `step`), i.e. conv/linear weights, biases, batch-norm affine parameters and
learned activation ranges (PACT clip values; Liu et al., "Sharpness-aware quantization for deep
neural networks"). An LSQ step is a scale of the quantizer, not of the function: a radius sized for
the weights (SAQ's 0.3) would move a step of 0.016 (an 8-bit image input's) through zero and
collapse SAQ fine-tuning to chance (tests/integration/test_search.py). The rule is on the dotted
name's components, so it also holds when a quantized layer is itself the model (its step size is
then `weight_quant.step`).

SAQ placement for the weights of fixed-precision layers (`saq_case`):
1. `L(Q(w) + eps(w))`: eps from the gradient of the latent weights, added after quantization;
2. `L(Q(w + eps(w)))`: added to the latent weights before quantization (a small eps rounds away);
3. `L(Q(w) + eps(Q(w)))`: eps from the gradient w.r.t. the quantized weights (kept from pass 1),
   added after quantization. Searchable layers always use case 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from framework.quant.layers import QUANT_LAYERS
from framework.sharpness.rules import SAM

NEVER_PERTURBED = ("alpha_w", "alpha_a", "step")  # leaf names: the search logits, LSQ step sizes
WEIGHT_QUANTIZERS = ("weight_quant", "weight_quants")  # module names: everything below them


def is_perturbed(name: str) -> bool:
    """Whether the parameter called `name` (as `named_parameters` spells it) is perturbed."""
    *modules, leaf = name.split(".")
    return leaf not in NEVER_PERTURBED and not any(part in WEIGHT_QUANTIZERS for part in modules)


class Perturbation:
    """Perturb and restore the parameters of `model` for `rule`, placed as SAQ case `saq_case` says.

    `perturbed` lists the `(name, parameter)` pairs that move (it may be narrowed after construction);
    `post_quant` maps a fixed-precision layer's weight name to the layer, for SAQ cases 1 and 3.
    """

    def __init__(self, model: nn.Module, rule: SAM | None, saq_case: int | None = None):
        if saq_case not in (None, 1, 2, 3):
            raise ValueError(f"SAQ case must be 1, 2 or 3, not {saq_case}")
        self.rule, self.saq_case = rule, saq_case
        self.perturbed: list[tuple[str, nn.Parameter]] = [
            (name, p) for name, p in model.named_parameters() if p.requires_grad and is_perturbed(name)
        ]
        self.post_quant: dict[str, nn.Module] = {}
        if saq_case in (1, 3):
            for name, module in model.named_modules():
                if isinstance(module, QUANT_LAYERS) and module.w_bits < 32:
                    self.post_quant[f"{name}.weight" if name else "weight"] = module
        self.batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def keep_quantized_weights(self, keep: bool) -> None:
        """Case 3 needs the gradient w.r.t. Q(w) from pass 1: the layers keep Q(w) when `keep`."""
        for layer in self.post_quant.values():
            layer.keep_quantized_weight = keep and self.saq_case == 3

    def kept_quantized_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The quantized weights kept by the last forward pass (that take part in the graph)."""
        return [(name, layer.quantized_weight) for name, layer in self.post_quant.items()
                if layer.quantized_weight is not None and layer.quantized_weight.requires_grad]

    def quantized_grads(self) -> dict[str, torch.Tensor]:
        """Gradients w.r.t. the kept quantized weights after a `backward()` (SAQ case 3's source)."""
        return {name: layer.quantized_weight.grad.detach() for name, layer in self.post_quant.items()
                if layer.quantized_weight is not None and layer.quantized_weight.grad is not None}

    @contextlib.contextmanager
    def applied(self, first: dict, quantized_grads: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside: theta + eps (eps from the first-pass gradients `first`, parameter -> gradient or
        None) with batch-norm statistics frozen; on exit theta exactly and the statistics back."""
        targets, saved = self._perturb(first, quantized_grads)
        self._freeze_bn_stats(True)
        try:
            yield
        finally:
            self._freeze_bn_stats(False)
            self._restore(targets, saved)

    def direction(self, g: torch.Tensor | None, g_p: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
        """The rule's update direction from the two passes' gradients (None if neither exists)."""
        if g is None and g_p is None:
            return None
        g = torch.zeros_like(p) if g is None else g
        g_p = torch.zeros_like(p) if g_p is None else g_p
        return self.rule.direction(g, g_p)

    def directions(self, firsts: list, seconds: list, params: list) -> list[torch.Tensor | None]:
        """:meth:`direction` for every parameter, through the rule's multi-tensor :meth:`directions`
        (hundreds of small tensors in a supernet: one op each instead of one per tensor)."""
        out: list[torch.Tensor | None] = [None] * len(params)
        index, gs, gps = [], [], []
        for i, (g, g_p, p) in enumerate(zip(firsts, seconds, params, strict=True)):
            if g is None and g_p is None:
                continue
            index.append(i)
            gs.append(torch.zeros_like(p) if g is None else g)
            gps.append(torch.zeros_like(p) if g_p is None else g_p)
        for i, d in zip(index, self.rule.directions(gs, gps), strict=True):
            out[i] = d
        return out

    # -- the pieces of `applied` ---------------------------------------------------------------------
    def _perturb(self, first: dict, quantized_grads: dict[str, torch.Tensor]) -> tuple[list, dict]:
        sources, targets = [], []
        for name, p in self.perturbed:
            if first.get(p) is None:
                continue
            layer = self.post_quant.get(name)
            source = quantized_grads.get(name) if layer is not None and self.saq_case == 3 else None
            sources.append(first[p] if source is None else source)
            targets.append((name, p, layer))
        eps = self.rule.perturbation(sources, [p for _, p, _ in targets])
        saved = {}
        with torch.no_grad():
            moved, steps = [], []
            for (_, p, layer), e in zip(targets, eps, strict=True):
                if layer is not None:
                    layer.weight_eps = e  # after quantization (SAQ cases 1 and 3)
                else:
                    moved.append(p)
                    steps.append(e)
            if moved:  # restored by copy: theta + eps - eps is not theta in floats
                saved = dict(zip(moved, torch._foreach_mul(moved, 1.0), strict=True))  # exact copies
                torch._foreach_add_(moved, steps)
        for layer in self.post_quant.values():
            layer.keep_quantized_weight = False
            layer.quantized_weight = None
        return targets, saved

    @staticmethod
    def _restore(targets: list, saved: dict) -> None:
        with torch.no_grad():
            for _, _, layer in targets:
                if layer is not None:
                    layer.weight_eps = None
            if saved:
                torch._foreach_copy_(list(saved), list(saved.values()))

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
