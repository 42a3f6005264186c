"""framework.stats: the paired difference the pipeline summary (and studies) read a comparison by."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from framework.stats import paired_difference

top1 = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(top1, top1), min_size=2, max_size=8))
def test_the_interval_is_scipys_paired_t_interval(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    got = paired_difference(a, b)
    assert got["n"] == len(pairs) and got["mean"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-12)
    if len({x - y for x, y in pairs}) == 1:  # no spread: scipy's interval is undefined (nan), ours is the point
        assert got["low"] == pytest.approx(got["high"], abs=1e-12)
        return
    expected = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got["low"] == pytest.approx(expected.low, abs=1e-9) and got["high"] == pytest.approx(expected.high, abs=1e-9)
    assert got["verdict"] == ("better" if got["low"] > 0 else "worse" if got["high"] < 0 else "no difference")


def test_a_consistent_gain_is_better_and_a_noisy_one_is_not():
    assert paired_difference([0.83, 0.84, 0.85], [0.82, 0.83, 0.84])["verdict"] == "better"
    assert paired_difference([0.81, 0.82, 0.83], [0.82, 0.83, 0.84])["verdict"] == "worse"
    noisy = paired_difference([0.8235, 0.8180, 0.8060], [0.8221, 0.8248, 0.8256])
    assert noisy["verdict"] == "no difference" and noisy["low"] < 0 < noisy["high"]


def test_one_seed_gives_no_interval():
    got = paired_difference([0.8235], [0.8221])
    assert got["verdict"] == "one seed" and got["low"] is None and got["mean"] == pytest.approx(0.0014)


@pytest.mark.parametrize("a, b, confidence, message", [
    ([0.8, 0.7], [0.8], 0.95, "one per seed"),
    ([], [], 0.95, "at least one seed"),
    ([0.8, 0.7], [0.8, 0.6], 1.0, "strictly between 0 and 1"),
])
def test_bad_input_is_refused(a, b, confidence, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b, confidence)
