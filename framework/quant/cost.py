"""The cost model: MACs per layer, BitOps and size under a policy, and the expected cost of a supernet.

MACs are measured, not derived from architecture tables: a forward pass of one `in_channels x S x S`
image with hooks on every convolution and linear layer records their output shapes, so any
registered model works at any input size. For a convolution
`MACs = H_out * W_out * C_out * (C_in / groups) * k_h * k_w`; for a linear layer `MACs = in * out`.

    BitOps  = sum_l MACs_l * b_w,l * b_a,l                 (fixed layers count at their fixed bits)
    Size    = sum_l params_l * b_w,l  +  32 * (all other parameters: biases, batch norm, ...)   [bits]
    E[b]    = sum_i softmax(alpha)_i * b_i
    C       = sum_l MACs_l * E[b_w,l] * E[b_a,l]          (differentiable w.r.t. the logits)

Penalties (METHOD.md sec. 3): linear `lambda * C / C_ref` (EdMIPS) or hinge to a budget
`lambda * max(0, C / C_target - 1)^2`. Reported as GBitOps (1e9) and MB (1e6 bytes).
Sanity anchor: torchvision ResNet-18 at 224x224 is 1.82 GMACs, so uniform 8/8 is ~116 GBitOps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from framework.quant.layers import QUANT_LAYERS, SEARCH_LAYERS


@dataclass
class LayerCost:
    """One convolution or linear layer, in execution order."""

    name: str
    kind: str  # "conv" or "linear"
    macs: int
    params: int  # weight elements (biases are counted with the 32-bit rest)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return int(out.shape[2] * out.shape[3] * module.out_channels * (module.in_channels // module.groups) * kh * kw)
    return int(module.in_features * module.out_features)


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: int, in_channels: int) -> list[LayerCost]:
    """Every conv and linear layer of `model` with its MACs for one image, in execution order.

    Trace the float model: quantizers in a converted model would initialise from the dummy input.
    """
    records: list[LayerCost] = []
    seen: set[str] = set()
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):

            def hook(mod, inputs, output, _name=name):
                if _name in seen:  # a layer called twice would count twice: record it once per call
                    raise RuntimeError(f"layer {_name} runs more than once per forward pass")
                seen.add(_name)
                records.append(
                    LayerCost(
                        name=_name,
                        kind="conv" if isinstance(mod, nn.Conv2d) else "linear",
                        macs=_macs(mod, output),
                        params=int(mod.weight.numel()),
                        in_shape=tuple(inputs[0].shape[1:]),
                        out_shape=tuple(output.shape[1:]),
                        groups=int(getattr(mod, "groups", 1)),
                    )
                )

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, int(in_channels), int(input_size), int(input_size), device=device))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return records


def float_parameter_count(model: nn.Module) -> int:
    """Parameters of the network itself (not quantizer steps, ranges or search logits)."""
    total = 0
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("alpha_w", "alpha_a", "step", "range"):
            continue
        total += param.numel()
    return total


def policy_cost(
    layers: list[LayerCost], bits: Mapping[str, tuple[int, int]], total_params: int
) -> dict[str, float]:
    """MACs, BitOps, GBitOps and size (MB) of `layers` under per-layer `(w_bits, a_bits)`."""
    macs = sum(layer.macs for layer in layers)
    bitops = sum(layer.macs * bits[layer.name][0] * bits[layer.name][1] for layer in layers)
    quantized_params = sum(layer.params for layer in layers)
    size_bits = sum(layer.params * bits[layer.name][0] for layer in layers) + 32 * (total_params - quantized_params)
    return {
        "macs": float(macs),
        "gmacs": macs / 1e9,
        "bitops": float(bitops),
        "gbitops": bitops / 1e9,
        "size_mb": size_bits / 8 / 1e6,
    }


def expected_bitops(model: nn.Module) -> torch.Tensor:
    """C = sum_l MACs_l E[b_w,l] E[b_a,l] over searchable layers plus fixed layers at their bits.

    Uses the `macs` each layer was given at conversion (:func:`framework.quant.build_supernet`).
    The search converts with layers traced at the target's input size, not the proxy's, so C is in
    BitOps at the target resolution, the resolution of the budget and of the policy's `cost.target`.
    """
    searched: torch.Tensor | None = None
    fixed = 0.0
    found = False
    for module in model.modules():
        if isinstance(module, SEARCH_LAYERS):
            bw, ba = module.expected_bits()
            term = module.macs * bw * ba
            searched = term if searched is None else searched + term
            found = True
        elif isinstance(module, QUANT_LAYERS):
            fixed += float(module.macs * module.w_bits * module.a_bits)
            found = True
        elif hasattr(module, "mpq_fixed_bits"):  # a fixed layer kept in full precision
            fixed += float(module.macs * module.mpq_fixed_bits[0] * module.mpq_fixed_bits[1])
    if not found:
        raise ValueError("the model has no quantized or searchable layers")
    if searched is None:
        return torch.tensor(fixed)
    return searched + fixed


#: the complexity penalties of the search (`search.complexity.penalty`)
PENALTIES = ("linear", "hinge")


def complexity_penalty(expected: torch.Tensor, mode: str, reference: float) -> torch.Tensor:
    """`C / C_ref` (mode "linear") or `max(0, C / C_target - 1)^2` (mode "hinge"), before the weight."""
    if mode == "linear":
        return expected / float(reference)
    if mode == "hinge":
        return torch.clamp(expected / float(reference) - 1.0, min=0.0) ** 2
    raise ValueError(f"unknown complexity penalty '{mode}'; choose one of {', '.join(PENALTIES)}")
