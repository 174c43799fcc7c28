"""Seeded, class-balanced subsets of a dataset."""

from __future__ import annotations

import numpy as np

from advlens.errors import DataError


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of ``n`` samples, as evenly spread over the classes as they allow.

    Each class gets ``n // n_classes`` (the remainder going to seeded random classes); a class
    with too few samples gives all it has and the others make up the difference.
    """
    labels = np.asarray(labels)
    if n < 0 or n > len(labels):
        raise DataError(
            f"cannot sample {n} of {len(labels)} samples: data.n must be in [0, {len(labels)}]"
        )
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros(0, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    # Water level: the largest L with sum(min(counts, L)) <= n; then one more sample for
    # `rest` seeded random classes that have more than L.
    level = 0
    while level < counts.max() and np.minimum(counts, level + 1).sum() <= n:
        level += 1
    quota = np.minimum(counts, level)
    rest = n - int(quota.sum())
    if rest:
        room = np.flatnonzero(counts > level)
        quota[rng.choice(room, size=rest, replace=False)] += 1
    picks = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)
