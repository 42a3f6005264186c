"""How decisive a bit search ended: did its distributions choose, or did the budget fit choose for them?

For the final bit distributions p of the searched layers (weights and activations, or one joint
distribution per layer) over K candidates each:

    entropy      = mean over distributions of H(p) / ln K      (1: uniform, the logits never moved; 0: one-hot)
    max_p        = mean over distributions of max_k p_k
    argmax_ratio = BitOps(argmax policy) / budget               (below 1: the fit raised layers; above: lowered)
    fit_changed  = the searched layers whose fitted pair differs from their argmax pair

A search whose mean normalised entropy exceeds :data:`UNDECIDED_ENTROPY` ended undecided: its policy
was chosen by the exact fit to the budget from near-uniform probabilities, not by the task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: above this mean normalised entropy a search is reported as undecided
UNDECIDED_ENTROPY = 0.8


def normalised_entropy(p: Sequence[float]) -> float:
    """H(p) / ln K for a distribution over K >= 2 outcomes (0 for K = 1)."""
    if len(p) < 2:
        return 0.0
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0) / math.log(len(p))


def decisiveness(probs: Mapping[str, Mapping[str, Sequence[float]]], argmax_bits: Mapping[str, tuple[int, int]],
                 fitted_bits: Mapping[str, tuple[int, int]], argmax_bitops: float | None,
                 budget_bitops: float | None) -> dict[str, Any]:
    """The record of the module's docstring; `probs[layer]` holds "w" and "a" (a joint layer, whose
    two entries are one distribution, counts it for both, as it chooses both)."""
    dists = [list(dist[side]) for dist in probs.values() for side in ("w", "a")]
    entropy = sum(normalised_entropy(d) for d in dists) / len(dists) if dists else 0.0
    changed = sorted(name for name in probs if tuple(fitted_bits[name]) != tuple(argmax_bits[name]))
    return {
        "entropy": entropy,
        "max_p": sum(max(d) for d in dists) / len(dists) if dists else 1.0,
        "argmax_ratio": argmax_bitops / budget_bitops if argmax_bitops is not None and budget_bitops else None,
        "fit_changed": changed,
        "undecided": entropy > UNDECIDED_ENTROPY,
    }
