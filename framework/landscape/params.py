"""What every landscape measurement shares: which parameters span the landscape, the loss closure
over fixed batches, and vectors of tensors (one tensor per parameter).

**The weights.** The landscape is taken over the network's weights `w`: the `weight` and `bias` of
every convolution and linear layer (quantized layers included: their latent, full-precision
weights) and the affine `weight` and `bias` of every normalisation layer (batch norm, group norm,
layer norm), as PyHessian (Yao et al., "PyHessian: neural networks through the lens of the
Hessian", IEEE BigData 2020) and SAM (Foret et al., ICLR 2021) take them. Everything else is held
fixed: quantizer step sizes and clipping ranges (LSQ `step`, learned-range `range`), searchable
layers' bit-width logits (`alpha_w`, `alpha_a`) and buffers (batch-norm running statistics). The
rule is on the module that owns the parameter, so a quantizer's `step` is never picked up.

**The loss.** A loss closure `loss(model)` returns an iterable of scalar tensors whose sum is
`L(w)`, computed from the model's current parameter values; a term per batch lets a measurement
free each batch's graph before the next one. The model is put in evaluation mode for every
measurement (:func:`evaluation`): batch norm then uses its running statistics and dropout is off,
so `L` is a deterministic function of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

#: `loss(model)`: scalar tensors (one per batch) whose sum is L(w) at the model's current weights
LossTerms = Callable[[nn.Module], Iterable[torch.Tensor]]
Tensors = list[torch.Tensor]

#: modules whose `weight` and `bias` are landscape weights (subclasses included: QConv2d, SearchLinear, ...)
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
)


def landscape_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The `(name, parameter)` pairs the landscape is taken over, in `named_parameters` order:
    weights and biases of convolutions and linear layers and the affine parameters of normalisation
    layers; never quantizer step sizes or ranges, search logits or frozen parameters."""
    owned = {id(module._parameters[leaf]) for module in model.modules() if isinstance(module, WEIGHT_MODULES)
             for leaf in ("weight", "bias") if module._parameters.get(leaf) is not None}
    return [(name, p) for name, p in model.named_parameters() if id(p) in owned and p.requires_grad]


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in evaluation mode for the block (batch-norm running statistics, no dropout), then
    every module back in the mode it was in."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def loss_value(model: nn.Module, loss: LossTerms) -> float:
    """`L(w)` at the model's current weights, without a graph."""
    with torch.no_grad(), evaluation(model):
        return float(sum(float(term) for term in loss(model)))


def gradient(model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor]) -> tuple[float, Tensors]:
    """`L(w)` and its gradient `g = dL/dw` over `params` (zeros where a parameter does not reach the
    loss), one batch term at a time; the parameters' `.grad` are left alone."""
    total, grads = 0.0, [torch.zeros_like(p) for p in params]
    with evaluation(model):
        for term in loss(model):
            total += float(term.detach())
            for acc, g in zip(grads, torch.autograd.grad(term, list(params), allow_unused=True), strict=True):
                if g is not None:
                    acc.add_(g)
    return total, grads


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """`<a, b>` over every tensor of two vectors (accumulated in float64)."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def norm(a: Sequence[torch.Tensor]) -> float:
    """`||a||_2` over every tensor of a vector."""
    return dot(a, a) ** 0.5


@torch.no_grad()
def set_parameters(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy `values` into `params` (in place)."""
    for p, value in zip(params, values, strict=True):
        p.copy_(value)


@contextlib.contextmanager
def restored(params: Sequence[torch.Tensor]) -> Iterator[Tensors]:
    """The parameters' values now (copies), written back bit for bit when the block ends."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        set_parameters(params, saved)


def random_vector(params: Sequence[torch.Tensor], seed: int) -> Tensors:
    """Standard normal entries shaped like `params`, drawn on the CPU from `seed` (the same on
    every device), in the parameters' dtype and device."""
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
            for p in params]
