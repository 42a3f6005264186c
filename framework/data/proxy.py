"""Class-balanced, seeded subsets: the proxy data of SEAM/ASGA, and the "few % of the target" runs.

A subset is defined by its sorted indices into the full split, so it is reproducible from
(targets, fraction or per_class, seed) alone; :func:`indices_hash` gives a short stable name for the
exact sample, recorded in results and policy provenance.
"""

from __future__ import annotations

import hashlib

import numpy as np

from framework.errors import MPQError


def balanced_subset(
    targets: np.ndarray, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of a labelled split.

    Every class contributes the same count `k`: `per_class` when given, else
    `k = max(1, round(fraction * N / C))` for N samples in C classes. A class with fewer than `k`
    samples contributes all of them. The draw within each class is a permutation from
    `numpy.random.default_rng(seed)`, so the subset is deterministic for a seed and changes with it.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if (fraction is None) == (per_class is None):
        raise MPQError("a subset needs exactly one of fraction (0 < f <= 1) or per_class (a count >= 1)")
    classes = np.unique(targets)
    if per_class is None:
        if not 0.0 < float(fraction) <= 1.0:
            raise MPQError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(float(fraction) * len(targets) / len(classes))))
    else:
        if int(per_class) < 1:
            raise MPQError(f"per_class must be at least 1, got {per_class}")
        k = int(per_class)
    rng = np.random.default_rng(int(seed))
    chosen = []
    for label in classes:
        members = np.flatnonzero(targets == label)
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen))


def indices_hash(indices: np.ndarray) -> str:
    """A short, platform-independent hash of a list of sample indices (sha256 of int64 LE, 16 hex)."""
    data = np.ascontiguousarray(np.asarray(indices, dtype="<i8")).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
