"""The exact fit of a policy to a budget (framework.policy.knapsack), against brute force.

Hypothesis draws small problems (1-5 searched layers, MACs, weight elements, candidate sets, joint
layers, probabilities with zeros, a fixed layer or none, a BitOps budget, a size budget or both, the
fill share); brute force enumerates every policy and applies the rule the fit promises: the most
probable policy in [fill * budget, budget] if there is one, else the most probable under the budget.
Objectives are compared, not bits (ties)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.errors import MPQError
from framework.policy import DEFAULT_FILL, BudgetLimits, fit_to_budget, log_probability
from framework.quant.cost import LayerCost, policy_cost

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BITS = [2, 3, 4, 6, 8]


def _layer(name, macs, params):
    return LayerCost(name=name, kind="conv", macs=macs, params=params, in_shape=(1,), out_shape=(1,))


@st.composite
def problems(draw, fill=None, feasible=True):
    n = draw(st.integers(1, 5))
    cw = sorted(draw(st.sets(st.sampled_from(BITS), min_size=1, max_size=3)))
    ca = sorted(draw(st.sets(st.sampled_from(BITS), min_size=1, max_size=3)))
    probability = st.floats(0.0, 1.0, allow_nan=False)
    layers, candidates, probs, joint = [], {}, {}, set()
    for i in range(n):
        layer = _layer(f"l{i}", draw(st.integers(1, 50_000)), draw(st.integers(1, 5_000)))
        layers.append(layer)
        if draw(st.booleans()):  # one set of logits for w and a
            joint.add(layer.name)
            candidates[layer.name] = (tuple(cw), tuple(cw))
            pw = draw(st.lists(probability, min_size=len(cw), max_size=len(cw)))
            probs[layer.name] = {"w": pw, "a": pw}
        else:
            candidates[layer.name] = (tuple(cw), tuple(ca))
            probs[layer.name] = {"w": draw(st.lists(probability, min_size=len(cw), max_size=len(cw))),
                                 "a": draw(st.lists(probability, min_size=len(ca), max_size=len(ca)))}
    bits = {name: (c[0][-1], c[1][-1]) for name, c in candidates.items()}  # the given policy: the highest bits
    if draw(st.booleans()):  # a fixed layer, not searched
        layers.insert(0, _layer("fixed", draw(st.integers(1, 50_000)), draw(st.integers(1, 5_000))))
        bits["fixed"] = (8, 8)
    total_params = sum(layer.params for layer in layers) + draw(st.integers(0, 2_000))
    low, high = _extremes(layers, candidates, joint, bits, total_params)
    kinds = draw(st.sampled_from([("bitops",), ("size",), ("bitops", "size")]))
    limits = {}
    for kind in kinds:
        share = draw(st.floats(0.0, 1.2) if feasible else st.floats(0.05, 0.95))
        limits[kind] = (low[kind] + share * (high[kind] - low[kind])) if feasible else share * low[kind]
    budget = BudgetLimits(bitops=limits.get("bitops"), size_mb=limits["size"] / 8e6 if "size" in limits else None)
    fill = draw(st.sampled_from([0.0, 0.5, 0.9, DEFAULT_FILL, 1.0])) if fill is None else fill
    return layers, bits, probs, candidates, joint, budget, total_params, fill


def _options(layer, candidates, joint):
    cw, ca = candidates[layer.name]
    return [(b, b) for b in cw] if layer.name in joint else list(itertools.product(cw, ca))


def _score(name, w, a, probs, candidates, joint):
    """log p(w) + log p(a), probabilities clipped at 1e-12; one log p(b) for a joint layer (one choice)."""
    cw, ca = candidates[name]
    log_w = math.log(max(probs[name]["w"][cw.index(w)], 1e-12))
    return log_w if name in joint else log_w + math.log(max(probs[name]["a"][ca.index(a)], 1e-12))


def _cost(layers, bits, total_params):
    cost = policy_cost(layers, bits, total_params)
    return {"bitops": cost["bitops"], "size": cost["size_mb"] * 8e6}


def _extremes(layers, candidates, joint, bits, total_params):
    lowest = {**bits, **{layer.name: _options(layer, candidates, joint)[0] for layer in layers if layer.name in candidates}}
    highest = {**bits, **{layer.name: _options(layer, candidates, joint)[-1] for layer in layers if layer.name in candidates}}
    return _cost(layers, lowest, total_params), _cost(layers, highest, total_params)


def _brute_force(layers, bits, probs, candidates, joint, budget, total_params, fill):
    """(best objective within [fill * B, B] or None, best objective within B or None) over every policy."""
    searched = [layer for layer in layers if layer.name in candidates]
    fixed = [layer for layer in layers if layer.name not in candidates]
    fixed_bitops = sum(layer.macs * bits[layer.name][0] * bits[layer.name][1] for layer in fixed)
    fixed_size = (sum(layer.params * bits[layer.name][0] for layer in fixed)
                  + 32 * (total_params - sum(layer.params for layer in layers)))
    score, bitops, size = np.zeros(()), np.full((), float(fixed_bitops)), np.full((), float(fixed_size))
    for layer in searched:  # the totals of every combination, one axis per layer
        options = _options(layer, candidates, joint)
        s = np.array([_score(layer.name, w, a, probs, candidates, joint) for w, a in options])
        score = score[..., None] + s
        bitops = bitops[..., None] + np.array([layer.macs * w * a for w, a in options], dtype=float)
        size = size[..., None] + np.array([layer.params * w for w, _ in options], dtype=float)
    within = np.ones(score.shape, dtype=bool)
    if budget.bitops is not None:
        within &= bitops <= budget.bitops
    if budget.size_mb is not None:
        within &= size <= budget.size_mb * 8e6
    on, limit = (bitops, budget.bitops) if budget.bitops is not None else (size, budget.size_mb * 8e6)
    filled = within & (on >= fill * limit)
    best = lambda mask: float(score[mask].max()) if mask.any() else None  # noqa: E731
    return best(filled), best(within)


@SETTINGS
@given(problems())
def test_the_fit_is_the_most_probable_policy_by_the_fill_rule(problem):
    layers, bits, probs, candidates, joint, budget, total_params, fill = problem
    filled, within = _brute_force(*problem)
    if within is None:
        with pytest.raises(MPQError):
            fit_to_budget(layers, bits, probs, candidates, budget, total_params, joint, fill)
        return
    fitted, record = fit_to_budget(layers, bits, probs, candidates, budget, total_params, joint, fill)
    expected = filled if filled is not None else within
    assert record["objective"] == pytest.approx(expected, abs=1e-5)
    assert log_probability(fitted, probs, candidates, joint) == pytest.approx(record["objective"])
    assert record["fill_held"] is (filled is not None or fill == 0)
    assert {name: fitted[name] for name in bits if name not in candidates} == {
        name: bits[name] for name in bits if name not in candidates}  # layers not searched keep their bits


@SETTINGS
@given(problems())
def test_the_fit_never_exceeds_the_budget(problem):
    layers, bits, probs, candidates, joint, budget, total_params, fill = problem
    try:
        fitted, record = fit_to_budget(layers, bits, probs, candidates, budget, total_params, joint, fill)
    except MPQError:
        return
    cost = _cost(layers, fitted, total_params)
    if budget.bitops is not None:
        assert cost["bitops"] <= budget.bitops and record["bitops"] == cost["bitops"]
    if budget.size_mb is not None:
        assert cost["size"] <= budget.size_mb * 8e6
        assert record["size_mb"] == pytest.approx(cost["size"] / 8e6)


@SETTINGS
@given(problems(fill=DEFAULT_FILL))
def test_the_fit_uses_the_budget_when_some_policy_can(problem):
    """Some policy costs within 3 % of the budget: so does the fit (on BitOps, else on size)."""
    layers, bits, probs, candidates, joint, budget, total_params, _ = problem
    filled, _ = _brute_force(*problem)
    if filled is None:
        return
    fitted, record = fit_to_budget(layers, bits, probs, candidates, budget, total_params, joint)
    cost = _cost(layers, fitted, total_params)
    if budget.bitops is not None:
        assert cost["bitops"] >= 0.97 * budget.bitops and record["bitops_ratio"] >= 0.97
    else:
        assert cost["size"] >= 0.97 * budget.size_mb * 8e6
    assert record["fill_held"] is True


@SETTINGS
@given(problems(feasible=False))
def test_a_budget_below_the_cheapest_policy_is_one_error_naming_the_key(problem):
    layers, bits, probs, candidates, joint, budget, total_params, fill = problem
    with pytest.raises(MPQError) as err:
        fit_to_budget(layers, bits, probs, candidates, budget, total_params, joint, fill)
    message = str(err.value)
    assert "is impossible" in message and "the cheapest policy" in message and "\n" not in message
    assert "raise search.budget_bitops" in message or "raise search.budget_size_mb" in message


def test_the_argmax_within_the_budget_is_kept():
    layers = [_layer("a", 100, 10), _layer("b", 200, 20)]
    candidates = {name: ((2, 4), (2, 4)) for name in ("a", "b")}
    probs = {"a": {"w": [0.1, 0.9], "a": [0.8, 0.2]}, "b": {"w": [0.3, 0.7], "a": [0.4, 0.6]}}
    argmax = {"a": (4, 2), "b": (4, 4)}
    fitted, record = fit_to_budget(layers, argmax, probs, candidates, BudgetLimits(bitops=100 * 8 + 200 * 16), 30, fill=0.97)
    assert fitted == argmax and record["applied"] is False and record["fill_held"] is True
    assert record["objective"] == pytest.approx(math.log(0.9 * 0.8 * 0.7 * 0.6))
