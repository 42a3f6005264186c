"""The exact fit of a policy to a budget for given per-(layer, pair) scores
(framework.policy.fit_scores_to_budget, what `policy=hawq` and `policy=sensitivity` maximise), against
brute force over every policy.

Hypothesis draws 3-4 searched layers (MACs, weight elements), candidates from {2, 3, 4} (and 6),
scores of any sign at a magnitude from 1e-9 to 1e3 (HAWQ's sensitivities are small numbers), a fixed
layer or none, a BitOps budget, a size budget or both, and the fill share; brute force applies the
rule the fit promises: the best total score in [fill * budget, budget] if some policy lies there,
else the best under the budget."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.errors import MPQError
from framework.policy import DEFAULT_FILL, BudgetLimits, fit_scores_to_budget
from framework.policy.knapsack import score_options
from framework.quant.cost import LayerCost, policy_cost

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _layer(name, macs, params):
    return LayerCost(name=name, kind="conv", macs=macs, params=params, in_shape=(1,), out_shape=(1,))


def _cost(layers, bits, total_params):
    cost = policy_cost(layers, bits, total_params)
    return {"bitops": cost["bitops"], "size": cost["size_mb"] * 8e6}


@st.composite
def problems(draw):
    n = draw(st.integers(3, 4))
    cw = sorted(draw(st.sets(st.sampled_from([2, 3, 4, 6]), min_size=2, max_size=3)))
    ca = sorted(draw(st.sets(st.sampled_from([2, 3, 4]), min_size=2, max_size=3)))
    scale = 10.0 ** draw(st.integers(-9, 3))
    score = st.floats(-1.0, 1.0, allow_nan=False).map(lambda s: s * scale)
    layers, candidates, scores = [], {}, {}
    for i in range(n):
        layer = _layer(f"l{i}", draw(st.integers(1, 50_000)), draw(st.integers(1, 5_000)))
        layers.append(layer)
        candidates[layer.name] = (tuple(cw), tuple(ca))
        scores[layer.name] = {pair: draw(score) for pair in itertools.product(cw, ca)}
    bits = {name: (cw[-1], ca[-1]) for name in candidates}
    if draw(st.booleans()):  # a fixed layer, not searched
        layers.insert(draw(st.integers(0, n)), _layer("fixed", draw(st.integers(1, 50_000)), draw(st.integers(1, 5_000))))
        bits["fixed"] = (8, 8)
    total_params = sum(layer.params for layer in layers) + draw(st.integers(0, 2_000))
    low = _cost(layers, {**bits, **{name: (cw[0], ca[0]) for name in candidates}}, total_params)
    high = _cost(layers, bits, total_params)
    kinds = draw(st.sampled_from([("bitops",), ("size",), ("bitops", "size")]))
    limits = {kind: low[kind] + draw(st.floats(0.0, 1.1)) * (high[kind] - low[kind]) for kind in kinds}
    budget = BudgetLimits(bitops=limits.get("bitops"), size_mb=limits["size"] / 8e6 if "size" in limits else None)
    fill = draw(st.sampled_from([0.0, 0.5, 0.9, DEFAULT_FILL]))
    return layers, bits, scores, candidates, budget, total_params, fill, scale


def _brute_force(layers, bits, scores, candidates, budget, total_params, fill):
    """(the best total score within [fill * B, B] or None, the best within B), over every policy."""
    searched = [name for name in candidates]
    best_filled = best_within = None
    for choice in itertools.product(*(list(scores[name]) for name in searched)):
        policy = {**bits, **dict(zip(searched, choice, strict=True))}
        cost = _cost(layers, policy, total_params)
        within = ((budget.bitops is None or cost["bitops"] <= budget.bitops)
                  and (budget.size_mb is None or cost["size"] <= budget.size_mb * 8e6))
        if not within:
            continue
        total = sum(scores[name][pair] for name, pair in zip(searched, choice, strict=True))
        best_within = total if best_within is None else max(best_within, total)
        on, limit = (cost["bitops"], budget.bitops) if budget.bitops is not None else (cost["size"], budget.size_mb * 8e6)
        if on >= fill * limit:
            best_filled = total if best_filled is None else max(best_filled, total)
    return best_filled, best_within


@SETTINGS
@given(problems())
def test_the_score_fit_is_the_best_policy_by_the_fill_rule(problem):
    layers, bits, scores, candidates, budget, total_params, fill, scale = problem
    filled, within = _brute_force(layers, bits, scores, candidates, budget, total_params, fill)
    if within is None:
        with pytest.raises(MPQError, match="is impossible"):
            fit_scores_to_budget(layers, bits, scores, candidates, budget, total_params, fill=fill)
        return
    fitted, record = fit_scores_to_budget(layers, bits, scores, candidates, budget, total_params, fill=fill)
    expected = filled if filled is not None else within
    total = sum(scores[name][fitted[name]] for name in candidates)
    # the optimum to the solver's tolerance on the normalised scores (|s| <= 1 there), at any magnitude
    assert total == pytest.approx(expected, abs=1e-6 * scale * len(candidates))
    assert record["objective"] == pytest.approx(total)
    assert record["fill_held"] is (filled is not None or fill == 0)
    cost = _cost(layers, fitted, total_params)
    assert budget.bitops is None or cost["bitops"] <= budget.bitops
    assert budget.size_mb is None or cost["size"] <= budget.size_mb * 8e6
    assert all(fitted[name] == bits[name] for name in bits if name not in candidates)  # not searched: kept


def test_the_best_policy_within_the_budget_is_kept_and_a_tie_goes_to_the_given_bits():
    layers = [_layer("a", 100, 10), _layer("b", 200, 20)]
    candidates = {name: ((2, 4), (2, 4)) for name in ("a", "b")}
    # b's sensitivity barely depends on its bits; a's does: a keeps 4/4, b takes what is left
    scores = {"a": {(2, 2): -9e-7, (2, 4): -5e-7, (4, 2): -4e-7, (4, 4): -1e-8},
              "b": {(2, 2): -2e-9, (2, 4): -1e-9, (4, 2): -1e-9, (4, 4): 0.0}}
    budget = BudgetLimits(bitops=100 * 16 + 200 * 8)
    fitted, record = fit_scores_to_budget(layers, {"a": (4, 4), "b": (4, 4)}, scores, candidates, budget, 30, fill=0.97)
    assert fitted["a"] == (4, 4) and fitted["b"] in ((2, 4), (4, 2)) and record["fill_held"] is True
    assert record["objective"] == pytest.approx(-1e-8 - 1e-9)
    given = {"a": (4, 4), "b": (4, 2)}  # equal to (2, 4): the given bits win the tie
    assert fit_scores_to_budget(layers, given, scores, candidates, budget, 30, fill=0.97)[0] == given
    given = {"a": (4, 4), "b": (2, 4)}
    assert fit_scores_to_budget(layers, given, scores, candidates, budget, 30, fill=0.97)[0] == given


@pytest.mark.parametrize("scores,message", [
    ({(2, 2): 0.0, (2, 4): 0.0, (4, 2): 0.0}, "no score for the pair W4/A4"),
    ({(2, 2): 0.0, (2, 4): 0.0, (4, 2): 0.0, (4, 4): float("nan")}, "W4/A4 is nan, not a finite number"),
    ({(2, 2): float("-inf"), (2, 4): 0.0, (4, 2): 0.0, (4, 4): 0.0}, "W2/A2 is -inf"),
])
def test_every_pair_needs_a_finite_score(scores, message):
    with pytest.raises(ValueError, match=message):
        score_options(((2, 4), (2, 4)), scores)


def test_a_joint_layer_chooses_among_equal_bits_only():
    assert score_options(((2, 4), (2, 4)), {(2, 2): -1.0, (4, 4): -0.5}, joint=True) == [(2, 2, -1.0), (4, 4, -0.5)]
    assert np.all(np.diff([w * 10 + a for w, a, _ in score_options(((4, 2), (4, 2)), {
        (w, a): 0.0 for w in (2, 4) for a in (2, 4)})]) > 0)  # ascending (w, a), whatever the candidates' order
