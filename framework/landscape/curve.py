"""A 1-D slice of the loss landscape along a filter-normalised random direction (Li et al.,
"Visualizing the loss landscape of neural nets", NeurIPS 2018)::

    d ~ N(0, I),   d_f <- d_f / ||d_f|| * ||w_f||   for every filter f
    curve(t) = L(w + t d),   t in linspace(-span, span, points)

A filter is an output channel of a convolution's weight (`weight[f]`) or a row of a linear layer's
weight; entries of `d` for 1-D parameters (biases, batch-norm affine parameters) are zero, as the
paper's "ignore biasbn" plots. Scaling each filter of `d` to the norm of the matching filter of `w`
makes curves of different networks comparable: a network whose filters are scaled (which a batch
norm after them undoes) has the same curve. `t = 1` moves every filter by its own norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from framework.landscape.params import LossTerms, Tensors, loss_value, random_vector, restored, set_parameters


@dataclass
class LossCurve:
    """The curve's points: `loss[i] = L(w + t[i] d)`."""

    t: list[float]
    loss: list[float]

    @property
    def argmin(self) -> float:
        """The `t` of the lowest loss (the first one on ties)."""
        return self.t[min(range(len(self.loss)), key=self.loss.__getitem__)]


@torch.no_grad()
def filter_normalized_direction(params: Sequence[torch.Tensor], seed: int = 0, eps: float = 1e-10) -> Tensors:
    """A random direction shaped like `params`, drawn from `seed` and normalised filter by filter:
    each slice `d[f]` of a parameter with two or more dimensions gets the norm of `w[f]`; parameters
    with one dimension or none (biases, batch-norm entries) get zeros."""
    direction = random_vector(params, seed)
    for d, w in zip(direction, params, strict=True):
        if d.dim() <= 1:
            d.zero_()
            continue
        d_norms = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
        w_norms = w.detach().flatten(1).norm(dim=1).view_as(d_norms)
        d.mul_(w_norms / (d_norms + eps))
    return direction


def loss_curve(model: nn.Module, loss: LossTerms, params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor],
               span: float = 1.0, points: int = 21) -> LossCurve:
    """`L(w + t d)` at `points` values of `t` evenly spaced on [-span, span]; the weights are
    restored bit for bit afterwards (each point is set from the saved `w`, not stepped to)."""
    params = list(params)
    last = int(points) - 1
    ts = [float(span) * (2 * i - last) / last for i in range(last + 1)]  # symmetric, t = 0 exact for odd points
    losses = []
    with restored(params) as w0:
        for t in ts:
            set_parameters(params, [w + t * d for w, d in zip(w0, direction, strict=True)])
            losses.append(loss_value(model, loss))
    return LossCurve(ts, losses)
