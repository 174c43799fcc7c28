"""Overlap statistics on neighbour indices (docs/design.md, "The overlap metric").

Array code for numpy or cupy (``xp``): per-point values from an (n, K) neighbour table sorted by
(distance, index), so that the first k columns are the exact k-NN for any k <= K (a k-sweep
needs one search at the largest k). Per class and bootstrap summaries run on the host.

Variants, per point (a point's k neighbours exclude itself):
- ``overlap``: 1.0 when at least one neighbour belongs to the other set, else 0.0;
- ``mixing``: (share of other-set neighbours) / 0.5, clipped to 1;
- ``pair``: for clean point i, 1.0 when its twin i + N is among its neighbours; the twin carries
  the same value, so that every variant's value is the mean of its per-point values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VARIANTS = ("overlap", "mixing", "pair")


def other_set(idx: Any, is_perturbed: Any, xp: Any = np) -> Any:
    """(n, K) bool: neighbour j of point i lies in the other set."""
    return is_perturbed[idx] != is_perturbed[:, None]


def per_point(variant: str, idx: Any, other: Any, k: int, xp: Any = np) -> Any:
    """Per-point values (n,) float64 of ``variant`` for the first ``k`` neighbours.

    ``pair`` assumes the sample-order convention (clean 0..N-1, twin of i is i + N).
    """
    if variant == "overlap":
        return other[:, :k].any(axis=1).astype(xp.float64)
    if variant == "mixing":
        share = other[:, :k].sum(axis=1).astype(xp.float64) / k
        return xp.minimum(share / 0.5, 1.0)
    if variant == "pair":
        n = idx.shape[0] // 2
        twin = xp.arange(n, 2 * n)[:, None]
        hit = (idx[:n, :k] == twin).any(axis=1).astype(xp.float64)
        return xp.concatenate([hit, hit])
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def per_class(values: np.ndarray, labels: np.ndarray | None) -> dict[int, float]:
    """Mean of ``values`` per label (host arrays of equal length); {} without labels."""
    if labels is None:
        return {}
    classes, inv = np.unique(labels, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(classes))
    counts = np.bincount(inv, minlength=len(classes))
    return {int(c): float(s / m) for c, s, m in zip(classes, sums, counts, strict=True)}


def bootstrap_ci(
    values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of per-point ``values`` (2N,) over ``n_boot`` resamples of
    the N samples with replacement, each sample bringing its clean point and its twin.

    The neighbour graph is held fixed: this is the spread due to which samples were attacked,
    not a re-embedding.
    """
    n = values.shape[0] // 2
    per_sample = (values[:n] + values[n:]) / 2.0
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 10_000_000 // max(n, 1))  # resamples per batch: bounded memory
    for a in range(0, n_boot, step):
        b = min(n_boot, a + step)
        draws = rng.integers(0, n, size=(b - a, n))
        means[a:b] = per_sample[draws].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)
