"""The exact fit of a policy to a budget: a multiple-choice knapsack, solved as a MILP by HiGHS
(`scipy.optimize.milp`).

Every searched layer l picks exactly one pair (w, a) of its candidates: w from its weight and a
from its activation candidates, or, for a layer with joint logits, one b with w = a = b. With a
binary x_{l,w,a} per layer and pair:

    maximise    sum_{l,w,a} x_{l,w,a} * s_l(w, a)
                s_l(w, a) = log max(p_l^w(w), eps) + log max(p_l^a(a), eps)    (joint: log max(p_l(b), eps))
    subject to  sum_{w,a} x_{l,w,a} = 1                                     for every searched layer l
                sum x_{l,w,a} * MACs_l * w * a  <=  B_bitops - F_bitops      (a BitOps budget)
                sum x_{l,w,a} * params_l * w    <=  8e6 * B_size - F_size    (a size budget, MB)
                sum x_{l,w,a} * MACs_l * w * a  >=  fill * B_bitops - F_bitops    (the fill bound;
                                                    on the size row when only a size budget is given)

so the chosen policy is the most probable one (the product of its per-layer probabilities, the
per-layer categorical distributions of the search being independent) among those that meet the
budget. :func:`fit_scores_to_budget` solves the same problem for arbitrary per-(layer, pair) scores
s_l(w, a) (e.g. minus a sensitivity, `policy=hawq`), under the same rows and the same fill rule; the
solver sees them divided by max |s_l(w, a)| (the same optimum; HiGHS stops at an absolute gap of
1e-6, which must not swallow the differences of small scores). F_bitops = sum MACs_l * w_l * a_l
over the layers that are not searched (fixed layers, at their bits), and F_size = sum params_l * w_l
over them + 32 * every parameter that is no conv or linear weight: the size of
framework.quant.cost.policy_cost, in bits. eps = 1e-12 keeps a probability of zero finite (such a
pair is chosen only when nothing else fits).

**Fill.** A policy far under its budget wastes it: the first solve asks for at least
`fill * budget` (`search.budget_fill`, 0.97 by default); when no policy lies in
[fill * budget, budget], the solve without the lower bound gives the most probable policy under the
budget. When not even that exists, an upper limit is below the cheapest policy (every searched
layer at its lowest candidates, the minimum of both rows at once): one :class:`MPQError` naming the
budget, that cheapest cost and the key to raise.

**Exactness and ties.** The cost rows are divided by their budget (coefficients <= 1), HiGHS solves
to a zero relative gap, the solution is rounded (the largest x of each layer) and its cost
recomputed in integers; a limit that the rounded solution breaks by the solver's tolerance is
tightened by the excess and the problem solved again. The problem is built in a fixed order (layers
as given, pairs in ascending (w, a)) and HiGHS is deterministic, so the same input gives the same
policy; the given bits (the argmax) win a tie with the solver's choice.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from framework.errors import MPQError
from framework.policy.budget import BudgetLimits
from framework.quant.cost import LayerCost

#: the smallest probability a log is taken of
EPS = 1e-12
#: the share of the budget a fitted policy uses at least, when some policy can (`search.budget_fill`)
DEFAULT_FILL = 0.97
_BITS_PER_MB = 8e6
_TRIES = 4
_TOLERANCE = 1e-6  # HiGHS's feasibility tolerance on the normalised rows, and a tie's margin

Bits = dict[str, tuple[int, int]]


def pair_options(
    candidates: tuple[Sequence[int], Sequence[int]], probs: Mapping[str, Sequence[float]], joint: bool = False
) -> list[tuple[int, int, float]]:
    """The pairs (w, a, s(w, a)) one layer chooses from, in ascending (w, a); `probs` gives the
    probabilities of the weight ("w") and activation ("a") candidates in their order."""
    cw, ca = (tuple(int(b) for b in c) for c in candidates)
    pw, pa = list(probs["w"]), list(probs["a"])
    if len(pw) != len(cw) or len(pa) != len(ca):
        raise ValueError(f"{len(pw)}/{len(pa)} probabilities for {len(cw)}/{len(ca)} candidates")
    score_w = {b: math.log(max(float(p), EPS)) for b, p in zip(cw, pw, strict=True)}
    score_a = {b: math.log(max(float(p), EPS)) for b, p in zip(ca, pa, strict=True)}
    if joint:
        return [(b, b, score_w[b]) for b in sorted(score_w)]
    return [(w, a, score_w[w] + score_a[a]) for w in sorted(score_w) for a in sorted(score_a)]


def score_options(
    candidates: tuple[Sequence[int], Sequence[int]], scores: Mapping[tuple[int, int], float], joint: bool = False
) -> list[tuple[int, int, float]]:
    """The pairs (w, a, s(w, a)) one layer chooses from, in ascending (w, a), with the scores given per
    pair: `scores[(w, a)]` for every w of the weight and a of the activation candidates (joint: every
    (b, b)); a missing or non-finite score is a ValueError."""
    cw, ca = (sorted(int(b) for b in c) for c in candidates)
    pairs = [(b, b) for b in cw] if joint else [(w, a) for w in cw for a in ca]
    options = []
    for w, a in pairs:
        if (w, a) not in scores:
            raise ValueError(f"no score for the pair W{w}/A{a}")
        score = float(scores[(w, a)])
        if not math.isfinite(score):
            raise ValueError(f"the score of the pair W{w}/A{a} is {score}, not a finite number")
        options.append((w, a, score))
    return options


def bitops_of(layers: Sequence[LayerCost], bits: Mapping[str, tuple[int, int]]) -> int:
    """sum_l MACs_l * w_l * a_l, in integers."""
    return sum(int(layer.macs) * int(bits[layer.name][0]) * int(bits[layer.name][1]) for layer in layers)


def size_bits_of(layers: Sequence[LayerCost], bits: Mapping[str, tuple[int, int]], total_params: int) -> int:
    """sum_l params_l * w_l + 32 * (the other parameters), in integers: policy_cost's size in bits."""
    quantized = sum(int(layer.params) for layer in layers)
    return sum(int(layer.params) * int(bits[layer.name][0]) for layer in layers) + 32 * (int(total_params) - quantized)


class _Problem:
    """The MILP of one fit: the pair options of each searched layer and the cost rows."""

    def __init__(self, layers, bits, probs, candidates, limits: BudgetLimits, total_params, joint, fill, scores=None):
        self.layers, self.limits, self.fill = list(layers), limits, float(fill)
        self.total_params = int(total_params)
        self.searched = [layer for layer in self.layers if layer.name in candidates]
        self.given = {layer.name: tuple(bits[layer.name]) for layer in self.layers if layer.name not in candidates}
        if scores is None:
            self.options = [pair_options(candidates[layer.name], probs[layer.name], layer.name in joint)
                            for layer in self.searched]
        else:
            self.options = [score_options(candidates[layer.name], scores[layer.name], layer.name in joint)
                            for layer in self.searched]
        others = [layer for layer in self.layers if layer.name not in candidates]
        # the cost rows: kind -> (coefficients over the variables, the constant part, the limit), in
        # BitOps and in bits of size
        self.rows: dict[str, tuple[np.ndarray, int, float]] = {}
        if limits.bitops is not None:
            coef = [layer.macs * w * a for layer, opts in zip(self.searched, self.options, strict=True) for w, a, _ in opts]
            self.rows["bitops"] = (np.array(coef, dtype=float), bitops_of(others, bits), float(limits.bitops))
        if limits.size_mb is not None:
            coef = [layer.params * w for layer, opts in zip(self.searched, self.options, strict=True) for w, _, _ in opts]
            constant = size_bits_of(others, bits, self.total_params) - 32 * sum(layer.params for layer in self.searched)
            self.rows["size"] = (np.array(coef, dtype=float), constant, float(limits.size_mb) * _BITS_PER_MB)
        self.fill_on = "bitops" if "bitops" in self.rows else "size"
        starts = np.cumsum([0] + [len(opts) for opts in self.options])
        self.blocks = [(int(starts[i]), int(starts[i + 1])) for i in range(len(self.options))]
        self.scores = np.array([s for opts in self.options for _, _, s in opts], dtype=float)
        # what the solver maximises: the log-probabilities as they are; given scores over their largest magnitude
        top = float(np.abs(self.scores).max()) if scores is not None and len(self.scores) else 0.0
        self.objective = self.scores / top if top > 0 else self.scores
        self.tie = 1e-9 * (top if top > 0 else 1.0)  # a tie's margin, in the scores' units

    # ------------------------------------------------------------------ the policy of a choice

    def bits_of(self, choice: Sequence[int]) -> Bits:
        picked = {layer.name: opts[i][:2] for layer, opts, i in zip(self.searched, self.options, choice, strict=True)}
        return {layer.name: tuple(int(b) for b in (picked.get(layer.name) or self.given[layer.name])) for layer in self.layers}

    def score_of(self, choice: Sequence[int]) -> float:
        return float(sum(opts[i][2] for opts, i in zip(self.options, choice, strict=True)))

    def costs(self, bits: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        return {"bitops": bitops_of(self.layers, bits), "size": size_bits_of(self.layers, bits, self.total_params)}

    def choice_of(self, bits: Mapping[str, tuple[int, int]]) -> list[int] | None:
        """The option index of each searched layer for `bits`; None if some pair is no option."""
        choice = []
        for layer, opts in zip(self.searched, self.options, strict=True):
            pairs = [(w, a) for w, a, _ in opts]
            pair = tuple(int(b) for b in bits.get(layer.name, ()))
            if pair not in pairs:
                return None
            choice.append(pairs.index(pair))
        return choice

    def meets(self, costs: Mapping[str, int], lower: bool) -> bool:
        """The exact check of the limits (and of the fill bound when `lower`)."""
        for kind, (_, _, limit) in self.rows.items():
            if costs[kind] > limit or (lower and kind == self.fill_on and costs[kind] < self.fill * limit):
                return False
        return True

    # ------------------------------------------------------------------ solving

    def cheapest(self) -> Bits:
        return self.bits_of([0] * len(self.options))  # pairs ascend in w and a: the first is the lowest

    def most_expensive(self) -> Bits:
        return self.bits_of([len(opts) - 1 for opts in self.options])

    def solve(self, lower: bool):
        """The best choice under the limits (and the fill bound when `lower`), or None; and the
        solver's result (None when nothing was solved)."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        n = len(self.scores)
        if n == 0:  # nothing is searched: the given bits are the policy, if they fit
            return ([] if self.meets(self.costs(self.bits_of([])), lower) else None), None
        one_each = np.zeros((len(self.blocks), n))
        for row, (start, stop) in enumerate(self.blocks):
            one_each[row, start:stop] = 1.0
        bounds = {kind: [-np.inf, (limit - constant) / limit] for kind, (_, constant, limit) in self.rows.items()}
        if lower and self.fill > 0:
            _, constant, limit = self.rows[self.fill_on]
            bounds[self.fill_on][0] = (self.fill * limit - constant) / limit
        result = None
        for _ in range(_TRIES):
            constraints = [LinearConstraint(one_each, 1.0, 1.0)] + [
                LinearConstraint(self.rows[kind][0][None, :] / self.rows[kind][2], lo, hi) for kind, (lo, hi) in bounds.items()
            ]
            result = milp(-self.objective, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                          options={"mip_rel_gap": 0.0, "presolve": True})
            if result.x is None:
                return None, result
            choice = [int(np.argmax(result.x[start:stop])) for start, stop in self.blocks]
            costs = self.costs(self.bits_of(choice))
            if self.meets(costs, lower):
                return choice, result
            for kind, (_, _, limit) in self.rows.items():  # beyond a limit by the tolerance: tighten it
                excess = (costs[kind] - limit) / limit
                if excess > 0:
                    bounds[kind][1] -= excess + _TOLERANCE
                if lower and kind == self.fill_on and costs[kind] < self.fill * limit:
                    bounds[kind][0] += (self.fill * limit - costs[kind]) / limit + _TOLERANCE
        return None, result


def _impossible(problem: _Problem) -> MPQError:
    cheapest = problem.costs(problem.cheapest())
    bitops, size = problem.rows.get("bitops"), problem.rows.get("size")
    if bitops is not None and cheapest["bitops"] > bitops[2]:
        return MPQError(
            f"the BitOps budget of {bitops[2] / 1e9:.4g} GBitOps is impossible: the cheapest policy (every searched "
            f"layer at its lowest candidate bits) costs {cheapest['bitops'] / 1e9:.4g} GBitOps; raise "
            f"search.budget_bitops or search.budget_uniform_bits"
        )
    if size is not None and cheapest["size"] > size[2]:
        return MPQError(
            f"the size budget of {size[2] / _BITS_PER_MB:.4g} MB is impossible: the cheapest policy (every searched "
            f"layer at its lowest candidate weight bits) is {cheapest['size'] / _BITS_PER_MB:.4g} MB; raise "
            f"search.budget_size_mb"
        )
    return MPQError(f"no policy meets the budget of {problem.limits.describe()}; raise search.budget_bitops, "
                    f"search.budget_uniform_bits or search.budget_size_mb")


def check_budget_reachable(
    layers: Sequence[LayerCost],
    bits: Mapping[str, tuple[int, int]],
    candidates: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    limits: BudgetLimits,
    total_params: int,
    joint: Collection[str] = frozenset(),
) -> None:
    """Raise the impossible-budget :class:`MPQError` of :func:`fit_to_budget` before any training:
    when the cheapest policy of the search space (every searched layer at its lowest candidate bits,
    the other layers at their `bits`) is above a limit, no search can end under the budget, so
    there is no point in training one. The probabilities do not matter here (uniform ones are used)."""
    probs = {name: {"w": [1.0] * len(cw), "a": [1.0] * len(ca)} for name, (cw, ca) in candidates.items()}
    problem = _Problem(layers, bits, probs, candidates, limits, total_params, frozenset(joint), fill=0.0)
    if not problem.meets(problem.costs(problem.cheapest()), lower=False):
        raise _impossible(problem)


def fit_to_budget(
    layers: Sequence[LayerCost],
    bits: Mapping[str, tuple[int, int]],
    probs: Mapping[str, Mapping[str, Sequence[float]]],
    candidates: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    limits: BudgetLimits,
    total_params: int,
    joint: Collection[str] = frozenset(),
    fill: float = DEFAULT_FILL,
) -> tuple[Bits, dict[str, Any]]:
    """The most probable policy within `limits`, filling at least `fill` of the budget when some
    policy can (see the module's docstring); and the record of the fit.

    `layers`: every conv and linear layer (MACs, weight elements); `bits`: the policy before the fit
    (the argmax of a search, a random draw), whose layers outside `candidates` keep their bits;
    `candidates[name]`: the ascending weight and activation candidates of each searched layer;
    `probs[name]`: their probabilities, `{"w": [...], "a": [...]}`; `joint`: the searched layers
    with one set of logits (w = a); `total_params`: every parameter of the float model (the size).

    The record: `method` ("milp"), `applied` (the fitted policy differs from `bits`), the solver's
    `status` and `message`, `objective` (the total log-probability), `bitops`, `budget_bitops`,
    `bitops_ratio`, `size_mb` and `budget_size_mb` with a size budget, `fill`, `fill_held`, and
    `bitops_before` (the cost of `bits`).
    """
    return _fit(_Problem(layers, bits, probs, candidates, limits, total_params, frozenset(joint), fill), bits, limits)


def fit_scores_to_budget(
    layers: Sequence[LayerCost],
    bits: Mapping[str, tuple[int, int]],
    scores: Mapping[str, Mapping[tuple[int, int], float]],
    candidates: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    limits: BudgetLimits,
    total_params: int,
    joint: Collection[str] = frozenset(),
    fill: float = DEFAULT_FILL,
) -> tuple[Bits, dict[str, Any]]:
    """The policy of the largest total score `sum_l scores[l][(w_l, a_l)]` within `limits`, filling at
    least `fill` of the budget when some policy can: :func:`fit_to_budget` with given scores in place
    of the log-probabilities (the same rows, fill rule, ties and record; `objective` is the total
    score). `scores[name]` maps every pair (w, a) of the layer's candidates (joint layers: every
    (b, b)) to a finite number; `bits` gives the layers outside `candidates` and wins ties.
    """
    problem = _Problem(layers, bits, None, candidates, limits, total_params, frozenset(joint), fill, scores=scores)
    return _fit(problem, bits, limits)


def _fit(problem: _Problem, bits: Mapping[str, tuple[int, int]], limits: BudgetLimits) -> tuple[Bits, dict[str, Any]]:
    """The fill rule on `problem`: within [fill * budget, budget] if some policy can be, else within
    the budget; the given `bits` win a tie; the record of :func:`fit_to_budget`."""
    if not problem.meets(problem.costs(problem.cheapest()), lower=False):
        raise _impossible(problem)
    choice, result, fill_held = None, None, False
    if problem.fill > 0:
        _, constant, limit = problem.rows[problem.fill_on]
        if problem.costs(problem.most_expensive())[problem.fill_on] >= problem.fill * limit:
            choice, result = problem.solve(lower=True)
            fill_held = choice is not None
    if choice is None:
        choice, result = problem.solve(lower=False)
    if choice is None:
        raise _impossible(problem)
    given = problem.choice_of(bits)  # a tie goes to the given bits
    if (given is not None and given != choice and problem.meets(problem.costs(problem.bits_of(given)), fill_held)
            and problem.score_of(given) >= problem.score_of(choice) - problem.tie):
        choice = given
    fitted = problem.bits_of(choice)
    costs = problem.costs(fitted)
    record: dict[str, Any] = {
        "method": "milp",
        "solver": "HiGHS (scipy.optimize.milp)",
        "applied": any(fitted[name] != tuple(bits[name]) for name in fitted),
        "status": int(result.status) if result is not None else 0,
        "message": str(result.message) if result is not None else "no searched layer: the given bits meet the budget",
        "objective": problem.score_of(choice),
        "bitops": float(costs["bitops"]),
        "budget_bitops": limits.bitops,
        "bitops_before": float(bitops_of(problem.layers, bits)),
        "fill": problem.fill,
        "fill_held": bool(problem.meets(costs, lower=True)) if problem.fill > 0 else True,
    }
    if limits.bitops is not None:
        record["bitops_ratio"] = costs["bitops"] / limits.bitops
    if limits.size_mb is not None:
        record.update(size_mb=costs["size"] / _BITS_PER_MB, budget_size_mb=limits.size_mb)
    return fitted, record


def log_probability(
    bits: Mapping[str, tuple[int, int]],
    probs: Mapping[str, Mapping[str, Sequence[float]]],
    candidates: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    joint: Collection[str] = frozenset(),
) -> float:
    """The objective of :func:`fit_to_budget` for a policy: sum over the searched layers of s_l(w, a)."""
    total = 0.0
    for name, cands in candidates.items():
        scores = {(w, a): s for w, a, s in pair_options(cands, probs[name], name in joint)}
        total += scores[tuple(int(b) for b in bits[name])]
    return total
