"""Per-layer traces of the loss Hessian, for a layer's weight and for its input activation, by
Hutchinson's estimator (Hutchinson, "A stochastic estimator of the trace of the influence matrix",
1990; as PyHessian, Yao et al., IEEE BigData 2020, and HAWQ-V2, Dong et al., NeurIPS 2020, use it)::

    Tr(H) = E_v[v^T H v],     v with independent Rademacher entries (+1 or -1, probability 1/2 each)

**Blocks.** For a block B of the variables (one layer's weight, or one layer's input),
`E[v_B^T (H v)_B] = Tr(H_BB)`, the trace of the block's diagonal block of H (`E[v v^T] = I`), so one
Hessian-vector product per probe serves every block at once. With m probes the estimate is the mean
of the m values `t_k = v_k,B^T (H v_k)_B` and its standard error `s / sqrt(m)`, s their sample
standard deviation (ddof 1; undefined with one probe). For the whole matrix a Rademacher probe's
variance is `2 sum_{i != j} H_ij^2`: a diagonal block is estimated exactly.

**Groups of blocks.** `v_B^T (H v)_B = v_B^T H_BB v_B + sum_{C != B} v_B^T H_BC v_C`: the terms
coupling B to the other blocks have mean zero but add variance. Between a layer's weight and the
inputs they are first-order (`y = W x` couples W and x through `dL/dy`, not through the curvature),
and on a pretrained ResNet they dominate the input traces' standard error. So blocks are put in G
groups (:func:`layer_traces`: the weights, the inputs), and each probe's product is taken
P = 2^ceil(log2 G) times, at `v^(p) = (s_g(C)(p) v_C)_C` with the groups' sign codes `s_g` the
columns of a P x P Walsh-Hadamard matrix (`sum_p s_g(p) s_h(p) = P [g = h]`)::

    t_B = (1/P) sum_p s_g(B)(p) v_B^T (H v^(p))_B = v_B^T sum_{C in the group of B} H_BC v_C

so the couplings across groups cancel exactly and `E[t_B] = Tr(H_BB)` still; a probe costs P products.

**Inputs.** The trace over the input activation x_l of layer l: on batch b a forward pre-hook adds a
zero tensor z_{b,l} that requires grad to the layer's input, so the layer computes on `x_l + z_{b,l}`
(the same values) and the loss is differentiable in z; its Hessian over z at z = 0 is the Hessian
over the input. The block of layer l is every batch's z_{b,l}: its trace is that of the Hessian of
`L` (the mean over all N samples) over the layer's input of every sample, and its size `n_x_l` the
number of input elements of all N samples.

The Hessian-vector products are those of :mod:`framework.landscape.hessian` (a double backward,
inside :func:`framework.quant.kernels.twice_differentiable`, the model in evaluation mode); the loss
is the mean cross-entropy over the fixed batches (:class:`framework.landscape.batches.CrossEntropyOnBatches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framework.landscape.batches import CrossEntropyOnBatches
from framework.landscape.hessian import _HeldGradients, hessian_vector_product
from framework.landscape.params import LossTerms, evaluation


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of one block's Hessian trace: the mean over `probes` probes, its
    standard error (NaN with one probe) and the block's number of elements `numel`."""

    trace: float
    std_error: float
    probes: int
    numel: int

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready (a NaN standard error as None)."""
        return {"trace": self.trace, "std_error": None if math.isnan(self.std_error) else self.std_error,
                "probes": self.probes, "numel": self.numel}


@dataclass
class LayerTraces:
    """The Hessian trace over a layer's weight and over its input activation."""

    weight: TraceEstimate
    input: TraceEstimate


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor shaped as `like` with independent entries +1 or -1, drawn on the CPU from `generator`."""
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


def sign_codes(groups: int) -> np.ndarray:
    """The P x `groups` sign codes of the module docstring: the first `groups` columns of the
    Walsh-Hadamard (Sylvester) matrix of order P = 2^ceil(log2 groups)."""
    codes = np.ones((1, 1))
    while codes.shape[0] < groups:
        codes = np.block([[codes, codes], [codes, -codes]])
    return codes[:, :groups]


def hutchinson_traces(model: nn.Module, loss: LossTerms, blocks: Sequence[Sequence[torch.Tensor]], probes: int,
                      seed: int = 0, hold_graphs: bool = True, groups: Sequence[int] | None = None) -> list[TraceEstimate]:
    """Hutchinson's estimate of `Tr(H_BB)` for every block B of `blocks` (each a list of tensors that
    require grad), H the Hessian of `L` (the sum of `loss(model)`'s terms) over all of them, from
    `probes` Rademacher probes drawn from `seed`. `groups[j]` (0, 1, ...) is block j's group, whose
    couplings to the other groups cancel (module docstring); None: one group, one Hessian-vector
    product per probe shared by every block. `hold_graphs`: build every batch's gradient graph once
    and hold it across the products (framework.landscape.hessian); False rebuilds them for each
    product (one batch's memory)."""
    if int(probes) < 1:
        raise ValueError(f"Hutchinson's estimator needs at least one probe, not {probes}")
    group_of = [0] * len(blocks) if groups is None else [int(g) for g in groups]
    if len(group_of) != len(blocks) or sorted(set(group_of)) != list(range(len(set(group_of)))):
        raise ValueError(f"groups {list(group_of)} must number the {len(blocks)} blocks' groups 0, 1, ...")
    codes = sign_codes(len(set(group_of)))
    params = [tensor for block in blocks for tensor in block]
    owner = [j for j, block in enumerate(blocks) for _ in block]  # the block of each tensor
    product = _HeldGradients(model, loss, params) if hold_graphs else (
        lambda vector: hessian_vector_product(model, loss, params, vector))
    generator = torch.Generator().manual_seed(int(seed))
    values = np.zeros((int(probes), len(blocks)))
    for k in range(int(probes)):
        v = [rademacher(p, generator) for p in params]
        for signs in codes:  # one product per row of the codes
            sign = [float(signs[group_of[owner[i]]]) for i in range(len(params))]
            hv = product([x * s for x, s in zip(v, sign, strict=True)])
            for i, (x, y) in enumerate(zip(v, hv, strict=True)):
                values[k, owner[i]] += sign[i] * float((x.double() * y.double()).sum()) / len(codes)
    means = values.mean(axis=0)
    errors = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.full(len(blocks), math.nan)
    return [TraceEstimate(float(means[j]), float(errors[j]), int(probes), sum(t.numel() for t in block))
            for j, block in enumerate(blocks)]


class _IndexedBatches(CrossEntropyOnBatches):
    """The mean cross-entropy over fixed batches, saying which batch it is on (`batch`) while the
    model runs on it, for the hooks that add the input probes."""

    batch = 0

    def __call__(self, model: nn.Module) -> Iterator[torch.Tensor]:
        for index, (images, labels) in enumerate(self.batches):
            self.batch = index
            yield F.cross_entropy(model(images), labels, reduction="sum") / self.samples


def layer_traces(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
                 probes: int, seed: int = 0, hold_graphs: bool = True) -> dict[str, LayerTraces]:
    """For every layer of `names` (modules with a `weight`), the Hessian trace of the mean
    cross-entropy over `batches` over the layer's weight and over its input activation (the input
    probes of the module docstring), from `probes` Rademacher probes drawn from `seed`, the weights
    and the inputs in two groups (two Hessian-vector products per probe). The model is left as it
    was (hooks removed, modes restored, no `.grad` written)."""
    loss = _IndexedBatches(batches)
    modules = {name: model.get_submodule(name) for name in names}
    shapes: dict[tuple[int, str], tuple[torch.Size, torch.dtype, torch.device]] = {}

    def recorder(name):
        def hook(module, args):
            shapes[(loss.batch, name)] = (args[0].shape, args[0].dtype, args[0].device)
        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in modules.items()]
    try:
        with torch.no_grad(), evaluation(model):
            for _ in loss(model):
                pass
    finally:
        for handle in handles:
            handle.remove()
    zeros = {key: torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
             for key, (shape, dtype, device) in shapes.items()}

    def adder(name):
        def hook(module, args):
            return (args[0] + zeros[(loss.batch, name)], *args[1:])
        return hook

    weight_blocks = [[module.weight] for module in modules.values()]
    input_blocks = [[zeros[(b, name)] for b in range(len(loss.batches))] for name in modules]
    handles = [module.register_forward_pre_hook(adder(name)) for name, module in modules.items()]
    try:
        estimates = hutchinson_traces(model, loss, weight_blocks + input_blocks, probes, seed, hold_graphs,
                                      groups=[0] * len(weight_blocks) + [1] * len(input_blocks))
    finally:
        for handle in handles:
            handle.remove()
    n = len(modules)
    return {name: LayerTraces(estimates[i], estimates[n + i]) for i, name in enumerate(modules)}
