"""The proxy sampler is class-balanced, deterministic for a seed and sensitive to it."""

from collections import Counter

import numpy as np
import pytest

from framework.data.proxy import balanced_subset, indices_hash
from framework.errors import MPQError

TARGETS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples
np.random.default_rng(0).shuffle(TARGETS)


def test_per_class_takes_exactly_k_of_each_class():
    idx = balanced_subset(TARGETS, per_class=7, seed=0)
    assert Counter(TARGETS[idx].tolist()) == {c: 7 for c in range(10)}
    assert len(set(idx.tolist())) == len(idx) == 70


def test_fraction_is_balanced():
    idx = balanced_subset(TARGETS, fraction=0.25, seed=0)
    assert Counter(TARGETS[idx].tolist()) == {c: 25 for c in range(10)}


def test_same_seed_same_subset_other_seed_other_subset():
    a, b = balanced_subset(TARGETS, fraction=0.1, seed=1), balanced_subset(TARGETS, fraction=0.1, seed=1)
    c = balanced_subset(TARGETS, fraction=0.1, seed=2)
    assert np.array_equal(a, b) and indices_hash(a) == indices_hash(b)
    assert not np.array_equal(a, c) and indices_hash(a) != indices_hash(c)


def test_hash_depends_on_the_indices_not_their_dtype():
    idx = balanced_subset(TARGETS, per_class=3, seed=0)
    assert indices_hash(idx.astype(np.int32)) == indices_hash(idx.astype(np.int64))
    assert indices_hash(idx[:-1]) != indices_hash(idx)


def test_small_classes_give_all_they_have():
    targets = np.array([0] * 50 + [1] * 3)
    idx = balanced_subset(targets, per_class=5, seed=0)
    assert Counter(targets[idx].tolist()) == {0: 5, 1: 3}


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"per_class": 0}, {}, {"fraction": 0.1, "per_class": 2}])
def test_invalid_requests_are_errors(kwargs):
    with pytest.raises(MPQError):
        balanced_subset(TARGETS, **kwargs)
