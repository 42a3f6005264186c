"""Paired comparisons over seeds: is policy A better than policy B, beyond what the seed moves?

Two fine-tunes that share a seed share their data order and augmentation, so the difference
`d_s = top1_A(s) - top1_B(s)` per seed `s` removes what the order contributes to both. Over `n`
seeds the mean difference `mean(d)` has the two-sided t interval

    mean(d) ± t_{n-1, (1 + c)/2} · sd(d) / sqrt(n)

(`sd` with `n - 1` degrees of freedom, `c` the confidence, 0.95 by default). The verdict is
`better` when the interval lies above 0, `worse` when below, `no difference` when it covers 0,
and `one seed` when `n = 1` (no interval exists).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

VERDICTS = ("better", "worse", "no difference", "one seed")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """The paired difference `a - b` (one value per seed, the same seeds in the same order).

    Returns `n`, `values` (the per-seed differences), `mean`, `std` (sample, 0 for one seed),
    `low`/`high` (the t interval at `confidence`; None for one seed) and `verdict`.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides: {len(a)} against {len(b)}")
    if not a:
        raise ValueError("a paired difference needs at least one seed")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} must lie strictly between 0 and 1")
    values = [float(x) - float(y) for x, y in zip(a, b, strict=False)]
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "values": values, "mean": mean, "std": 0.0, "low": None, "high": None,
                "confidence": confidence, "verdict": "one seed"}
    from scipy.stats import t

    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference"
    return {"n": n, "values": values, "mean": mean, "std": std, "low": low, "high": high,
            "confidence": confidence, "verdict": verdict}
