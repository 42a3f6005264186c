"""Per-layer bits: from a search (:func:`derive_bits`, the argmax of the logits per layer, fitted to
a budget by :func:`framework.policy.knapsack.fit_to_budget`), or from the baselines :func:`uniform_bits` (`policy=uniform:W/A`,
:func:`parse_uniform`) and :func:`random_bits` (seeded, under a budget).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from framework.errors import MPQError
from framework.quant.cost import LayerCost
from framework.quant.layers import SEARCH_LAYERS
from framework.quant.quantizers import SUPPORTED_BITS


def parse_uniform(spec: str) -> tuple[int, int] | None:
    """`uniform:W/A` -> (W, A); anything else -> None."""
    if not str(spec).startswith("uniform:"):
        return None
    body = str(spec).split(":", 1)[1]
    try:
        w, a = (int(part) for part in body.split("/"))
    except ValueError:
        raise MPQError(f"policy={spec} is malformed; write uniform:W/A with whole numbers, e.g. uniform:4/4") from None
    for value in (w, a):
        if value not in SUPPORTED_BITS:
            raise MPQError(f"policy={spec}: {value} bits is not supported; use one of {list(SUPPORTED_BITS)}")
    return w, a


def uniform_bits(layers: list[LayerCost], w_bits: int, a_bits: int, fixed: set[str], fixed_bits: int | None) -> dict[str, tuple[int, int]]:
    """Every layer at W/A, the fixed layers at `fixed_bits`."""
    return {
        layer.name: ((fixed_bits, fixed_bits) if layer.name in fixed and fixed_bits else (w_bits, a_bits))
        for layer in layers
    }


def _bitops(layers: list[LayerCost], bits: Mapping[str, tuple[int, int]]) -> float:
    return float(sum(layer.macs * bits[layer.name][0] * bits[layer.name][1] for layer in layers))


def random_bits(
    layers: list[LayerCost], candidates_w: list[int], candidates_a: list[int], fixed: set[str], fixed_bits: int | None,
    budget_bitops: float | None, seed: int,
) -> dict[str, tuple[int, int]]:
    """A seeded random policy: bits drawn uniformly from the candidates, then lowered at random
    (one candidate step of one layer at a time) until the BitOps budget holds."""
    rng = np.random.default_rng(int(seed))
    cw, ca = sorted(candidates_w), sorted(candidates_a)
    bits: dict[str, tuple[int, int]] = {}
    for layer in layers:
        if layer.name in fixed and fixed_bits:
            bits[layer.name] = (fixed_bits, fixed_bits)
        else:
            bits[layer.name] = (int(rng.choice(cw)), int(rng.choice(ca)))
    if budget_bitops is None:
        return bits
    floor = {**bits, **{layer.name: (cw[0], ca[0]) for layer in layers if layer.name not in fixed or not fixed_bits}}
    if _bitops(layers, floor) > budget_bitops:
        raise MPQError(
            f"budget {budget_bitops / 1e9:.4f} GBitOps is impossible: even the lowest candidates "
            f"({cw[0]}/{ca[0]} bits) cost {_bitops(layers, floor) / 1e9:.4f} GBitOps; raise the budget"
        )
    while _bitops(layers, bits) > budget_bitops:
        moves = [
            (name, side)
            for name, (w, a) in bits.items()
            if not (name in fixed and fixed_bits)
            for side, value, cands in ((0, w, cw), (1, a, ca))
            if cands.index(value) > 0
        ]
        name, side = moves[int(rng.integers(len(moves)))]
        w, a = bits[name]
        if side == 0:
            w = cw[cw.index(w) - 1]
        else:
            a = ca[ca.index(a) - 1]
        bits[name] = (w, a)
    return bits


def derive_bits(model) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, list[float]]]]:
    """Per searchable layer, the argmax of the logits (EdMIPS/GMPQ); also the probabilities."""
    bits, probs = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, SEARCH_LAYERS):
            pw, pa = (p.detach().cpu() for p in module.bit_probabilities())
            bits[name] = (module.w_candidates[int(pw.argmax())], module.a_candidates[int(pa.argmax())])
            probs[name] = {"w": pw.tolist(), "a": pa.tolist()}
        elif hasattr(module, "w_bits") and hasattr(module, "a_bits"):
            bits[name] = (module.w_bits, module.a_bits)
        elif hasattr(module, "mpq_fixed_bits"):  # a fixed layer kept in full precision
            bits[name] = tuple(module.mpq_fixed_bits)
    return bits, probs
