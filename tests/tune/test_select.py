"""Selection on known trial results: the Pareto front and the best policy under the budget."""

import math

import pytest

from framework.errors import MPQError
from framework.tune.select import best_under_budget, pareto_front, top_under_budget

# (key, proxy top-1, BitOps): c is dominated by b (less accurate, more BitOps), e by d,
# f has no policy (a stopped trial), g ties b exactly.
TRIALS = [
    {"key": "a", "proxy_top1": 0.50, "bitops": 100.0},
    {"key": "b", "proxy_top1": 0.60, "bitops": 150.0},
    {"key": "c", "proxy_top1": 0.55, "bitops": 160.0},
    {"key": "d", "proxy_top1": 0.70, "bitops": 220.0},
    {"key": "e", "proxy_top1": 0.65, "bitops": 230.0},
    {"key": "f", "proxy_top1": None, "bitops": None},
    {"key": "g", "proxy_top1": 0.60, "bitops": 150.0},
]


def keys(trials):
    return [t["key"] for t in trials]


def test_the_pareto_front_holds_exactly_the_non_dominated_trials_cheapest_first():
    assert keys(pareto_front(TRIALS)) == ["a", "b", "g", "d"]


def test_a_trial_that_is_better_in_both_makes_the_front_a_single_point():
    trials = [{"key": "x", "proxy_top1": 0.9, "bitops": 10.0}, {"key": "y", "proxy_top1": 0.5, "bitops": 20.0}]
    assert keys(pareto_front(trials)) == ["x"]
    assert pareto_front([]) == []


def test_the_best_under_budget_is_the_most_accurate_trial_within_it():
    assert best_under_budget(TRIALS, 225.0)["key"] == "d"
    assert best_under_budget(TRIALS, 200.0)["key"] == "b"   # d is over; b and g tie: the key decides
    assert best_under_budget(TRIALS, 150.0)["key"] == "b"   # a policy exactly at the budget meets it
    assert best_under_budget(TRIALS, 149.0)["key"] == "a"


def test_accuracy_ties_go_to_the_cheaper_policy():
    trials = [{"key": "z", "proxy_top1": 0.6, "bitops": 120.0}, {"key": "y", "proxy_top1": 0.6, "bitops": 90.0}]
    assert best_under_budget(trials, 200.0)["key"] == "y"


def test_the_best_is_independent_of_the_order_trials_finished_in():
    assert best_under_budget(list(reversed(TRIALS)), 200.0)["key"] == best_under_budget(TRIALS, 200.0)["key"]


def test_top_k_lists_the_best_policies_under_the_budget_in_order():
    assert keys(top_under_budget(TRIALS, 225.0, 3)) == ["d", "b", "g"]
    assert keys(top_under_budget(TRIALS, 120.0, 3)) == ["a"]
    with pytest.raises(MPQError, match="tune.top_k"):
        top_under_budget(TRIALS, 225.0, 0)


def test_no_trial_under_the_budget_is_one_clear_error_naming_the_cheapest():
    with pytest.raises(MPQError, match=r"no finished trial is under the budget.*trial a.*search.budget_bitops"):
        best_under_budget(TRIALS, 50.0)


def test_selecting_without_a_budget_says_which_key_to_set():
    with pytest.raises(MPQError, match="search.budget_bitops"):
        best_under_budget(TRIALS, None)


def test_trials_without_a_policy_take_no_part():
    stopped = [{"key": "s", "proxy_top1": math.nan, "bitops": None}, {"key": "t", "proxy_top1": 0.9, "bitops": None}]
    assert pareto_front(stopped) == []
    with pytest.raises(MPQError, match="no trial finished"):
        best_under_budget(stopped, 100.0)
