"""framework.search.decisiveness: what a search's result.json says about whether it chose."""

import math

import pytest

from framework.search.decisiveness import UNDECIDED_ENTROPY, decisiveness, normalised_entropy


def test_normalised_entropy_is_one_for_uniform_and_zero_for_one_hot():
    assert normalised_entropy([0.25] * 4) == pytest.approx(1.0)
    assert normalised_entropy([0.0, 1.0, 0.0]) == 0.0
    assert normalised_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(math.log(2) / math.log(4))


def test_a_near_uniform_search_is_undecided_and_a_committed_one_is_not():
    argmax = {"a": (2, 2), "b": (4, 3)}
    uniformish = {"a": {"w": [0.26, 0.25, 0.25, 0.24], "a": [0.25] * 4}, "b": {"w": [0.24, 0.25, 0.26, 0.25], "a": [0.25] * 4}}
    record = decisiveness(uniformish, argmax, {"a": (2, 2), "b": (3, 3)}, argmax_bitops=50.0, budget_bitops=100.0)
    assert record["entropy"] > UNDECIDED_ENTROPY and record["undecided"] is True
    assert record["fit_changed"] == ["b"] and record["argmax_ratio"] == pytest.approx(0.5)
    committed = {"a": {"w": [0.97, 0.01, 0.01, 0.01], "a": [0.97, 0.01, 0.01, 0.01]},
                 "b": {"w": [0.01, 0.01, 0.97, 0.01], "a": [0.01, 0.97, 0.01, 0.01]}}
    record = decisiveness(committed, argmax, argmax, argmax_bitops=100.0, budget_bitops=None)
    assert record["entropy"] < 0.2 and record["undecided"] is False
    assert record["fit_changed"] == [] and record["argmax_ratio"] is None and record["max_p"] == pytest.approx(0.97)


def test_every_layer_counts_its_weight_and_activation_distribution():
    record = decisiveness({"a": {"w": [1.0, 0.0], "a": [0.5, 0.5]}}, {"a": (2, 2)}, {"a": (2, 2)}, None, None)
    assert record["entropy"] == pytest.approx(0.5) and record["max_p"] == pytest.approx(0.75)
