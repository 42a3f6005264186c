"""Picking the policy to transfer from a sweep's finished trials (pure functions).

Each trial is a mapping with at least `proxy_top1` (accuracy on the proxy's validation split, to
maximise) and `bitops` (of its derived policy at the target resolution, to minimise), plus a `key`
that breaks ties so the choice never depends on the order trials finished in.

- :func:`pareto_front`: the trials no other trial dominates, i.e. the accuracy/BitOps trade-off
  one can actually choose from;
- :func:`best_under_budget`: the most accurate trial whose policy meets the budget (ties: fewer
  BitOps, then the key), the policy a sweep transfers;
- :func:`top_under_budget`: the best k of those, for fine-tuning several.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from framework.errors import MPQError

Trial = Mapping[str, Any]


def _valid(trial: Trial) -> bool:
    values = (trial.get("proxy_top1"), trial.get("bitops"))
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _dominates(a: Trial, b: Trial) -> bool:
    """`a` is at least as accurate and as cheap as `b`, and strictly better in one."""
    return (a["proxy_top1"] >= b["proxy_top1"] and a["bitops"] <= b["bitops"]
            and (a["proxy_top1"] > b["proxy_top1"] or a["bitops"] < b["bitops"]))


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """The non-dominated trials (proxy top-1 up, BitOps down), cheapest first.

    Trials without finite `proxy_top1` and `bitops` (stopped, failed) take no part. Two trials at
    the same point are both on the front: neither is better.
    """
    candidates = [t for t in trials if _valid(t)]
    front = [t for t in candidates if not any(_dominates(o, t) for o in candidates)]
    return sorted(front, key=lambda t: (t["bitops"], -t["proxy_top1"], str(t.get("key", ""))))


def _ranked_under_budget(trials: Sequence[Trial], budget_bitops: float | None) -> list[Trial]:
    if budget_bitops is None or not isinstance(budget_bitops, (int, float)) or not budget_bitops > 0:
        raise MPQError("selecting a policy needs a budget: set search.budget_bitops=<BitOps at the target resolution> "
                       "(or search.budget_uniform_bits=<bits>)")
    candidates = [t for t in trials if _valid(t)]
    if not candidates:
        raise MPQError("no trial finished with a policy, so there is nothing to select; see the trials' errors in result.json")
    under = [t for t in candidates if t["bitops"] <= budget_bitops]
    if not under:
        cheapest = min(candidates, key=lambda t: t["bitops"])
        raise MPQError(
            f"no finished trial is under the budget of {budget_bitops / 1e9:.4g} GBitOps (the cheapest, trial "
            f"{cheapest.get('key', '?')}, needs {cheapest['bitops'] / 1e9:.4g}); raise search.budget_bitops, or keep "
            f"search.repair=true so that every searched policy is repaired to the budget"
        )
    return sorted(under, key=lambda t: (-t["proxy_top1"], t["bitops"], str(t.get("key", ""))))


def best_under_budget(trials: Sequence[Trial], budget_bitops: float | None) -> Trial:
    """The most accurate trial with `bitops <= budget_bitops` (ties: fewer BitOps, then key).

    Raises :class:`MPQError` when there is no budget, no finished trial, or none under the budget.
    """
    return _ranked_under_budget(trials, budget_bitops)[0]


def top_under_budget(trials: Sequence[Trial], budget_bitops: float | None, k: int) -> list[Trial]:
    """The `k` best trials under the budget, best first (fewer if fewer meet it)."""
    if k < 1:
        raise MPQError(f"tune.top_k={k!r} is invalid: expected a whole number >= 1")
    return _ranked_under_budget(trials, budget_bitops)[:k]
