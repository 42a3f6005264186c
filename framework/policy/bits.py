"""Per-layer bits: from a search (:func:`derive_bits`, the argmax of the logits per layer, fitted to
a budget by :func:`framework.policy.knapsack.fit_to_budget`), or from the baselines
:func:`uniform_bits` (`policy=uniform:W/A`, :func:`parse_uniform`), :func:`random_bits`
(`policy=random:<seed>`, :func:`parse_random`: a seeded draw, fitted to the budget) and
:func:`uniform_budget_bits` (`policy=uniform-budget`: the uniform W/A with the most BitOps within the
budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from framework.errors import MPQError
from framework.policy.budget import BudgetLimits
from framework.policy.knapsack import DEFAULT_FILL, bitops_of, fit_to_budget, size_bits_of
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


def parse_random(spec: str) -> int | None:
    """`random:<seed>` -> seed (a whole number >= 0); anything else -> None."""
    if not str(spec).startswith("random:"):
        return None
    body = str(spec).split(":", 1)[1]
    if not body.isdigit():
        raise MPQError(f"policy={spec} is malformed; write random:<seed> with a whole number >= 0, e.g. random:3")
    return int(body)


def draw_bits(
    layers: list[LayerCost], candidates_w: Sequence[int], candidates_a: Sequence[int], fixed: set[str],
    fixed_bits: int | None, seed: int,
) -> dict[str, tuple[int, int]]:
    """Per searched layer (in order) a weight, then an activation bit-width drawn uniformly from the
    candidates by `numpy.random.default_rng(seed)`; the fixed layers at `fixed_bits`."""
    rng = np.random.default_rng(int(seed))
    cw, ca = sorted(candidates_w), sorted(candidates_a)
    return {
        layer.name: ((fixed_bits, fixed_bits) if layer.name in fixed and fixed_bits
                     else (int(rng.choice(cw)), int(rng.choice(ca))))
        for layer in layers
    }


def near(candidates: Sequence[int], drawn: int) -> list[float]:
    """Probabilities over the ascending `candidates` that prefer `drawn`, then its neighbours:
    p(c_i) proportional to 4^-|i - j| for the drawn c_j, so p(drawn) >= 0.6."""
    j = list(candidates).index(drawn)
    weights = [4.0 ** -abs(i - j) for i in range(len(candidates))]
    return [w / sum(weights) for w in weights]


def random_bits(
    layers: list[LayerCost], candidates_w: Sequence[int], candidates_a: Sequence[int], fixed: set[str],
    fixed_bits: int | None, seed: int, limits: BudgetLimits | None = None, total_params: int = 0,
    fill: float = DEFAULT_FILL,
) -> tuple[dict[str, tuple[int, int]], dict[str, Any] | None]:
    """A seeded random policy (`policy=random:<seed>`): the draw of :func:`draw_bits`, and under
    `limits` the budget-meeting policy closest to it, :func:`fit_to_budget` with the probabilities
    :func:`near` the draw (so the fit keeps as many drawn bits as the budget and its fill allow).
    Returns the bits and the fit's record (None without limits)."""
    drawn = draw_bits(layers, candidates_w, candidates_a, fixed, fixed_bits, seed)
    if limits is None:
        return drawn, None
    cw, ca = tuple(sorted(candidates_w)), tuple(sorted(candidates_a))
    searched = [layer.name for layer in layers if not (layer.name in fixed and fixed_bits)]
    probs = {name: {"w": near(cw, drawn[name][0]), "a": near(ca, drawn[name][1])} for name in searched}
    return fit_to_budget(layers, drawn, probs, {name: (cw, ca) for name in searched}, limits, total_params, fill=fill)


def _uniform_fits(layers, candidates_w, candidates_a, fixed, fixed_bits, limits, total_params):
    """Every uniform W/A of the candidates within `limits`: ((w, a), bits, BitOps, size in bits)."""
    for w in sorted(candidates_w):
        for a in sorted(candidates_a):
            bits = uniform_bits(layers, w, a, fixed, fixed_bits)
            bitops, size = bitops_of(layers, bits), size_bits_of(layers, bits, total_params)
            if (limits.bitops is None or bitops <= limits.bitops) and (limits.size_mb is None or size <= limits.size_mb * 8e6):
                yield (w, a), bits, bitops, size


def uniform_budget_bits(
    layers: list[LayerCost], candidates_w: Sequence[int], candidates_a: Sequence[int], fixed: set[str],
    fixed_bits: int | None, limits: BudgetLimits, total_params: int,
) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """`policy=uniform-budget`: the uniform W/A (W from `candidates_w`, A from `candidates_a`, the
    fixed layers at `fixed_bits`) with the most BitOps within `limits`; ties go to the larger W.
    Returns the bits and a record (the pair, its cost and the budget)."""
    fits = [((bitops, w), (w, a), bits, size)
            for (w, a), bits, bitops, size in _uniform_fits(layers, candidates_w, candidates_a, fixed, fixed_bits,
                                                            limits, total_params)]
    if not fits:
        low = uniform_bits(layers, min(candidates_w), min(candidates_a), fixed, fixed_bits)
        raise MPQError(
            f"policy=uniform-budget: no uniform W/A of the candidates {sorted(candidates_w)} x {sorted(candidates_a)} meets "
            f"the budget of {limits.describe()} (the cheapest, {min(candidates_w)}/{min(candidates_a)}, costs "
            f"{bitops_of(layers, low) / 1e9:.4g} GBitOps, {size_bits_of(layers, low, total_params) / 8e6:.4g} MB); "
            f"raise search.budget_uniform_bits, search.budget_bitops or search.budget_size_mb"
        )
    (bitops, _), (w, a), bits, size = max(fits, key=lambda fit: fit[0])
    record: dict[str, Any] = {"w_bits": w, "a_bits": a, "bitops": float(bitops), "budget_bitops": limits.bitops}
    if limits.bitops is not None:
        record["bitops_ratio"] = bitops / limits.bitops
    if limits.size_mb is not None:
        record.update(size_mb=size / 8e6, budget_size_mb=limits.size_mb)
    return bits, record


def uniform_frontier(
    layers: list[LayerCost], candidates_w: Sequence[int], candidates_a: Sequence[int], fixed: set[str],
    fixed_bits: int | None, limits: BudgetLimits, total_params: int,
) -> list[tuple[int, int]]:
    """The uniform frontier of a budget: every uniform W/A of the candidates within `limits` that no
    other one within them dominates (W' >= W and A' >= A), larger W first. At 2.5 average bits over
    {2, 3, 4, 6} it is 3/2 and 2/3; at 3 bits, 4/2, 3/3 and 2/4. Which of them is the strongest
    uniform baseline is for held-out data to say, not the order they are listed in."""
    fits = [(int(w), int(a)) for (w, a), *_ in _uniform_fits(layers, candidates_w, candidates_a, fixed, fixed_bits,
                                                              limits, total_params)]
    frontier = [(w, a) for w, a in fits if not any((w2 >= w and a2 >= a) and (w2, a2) != (w, a) for w2, a2 in fits)]
    return sorted(frontier, reverse=True)


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
