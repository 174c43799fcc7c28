"""Overlap statistics on neighbour indices (docs/design.md, "The overlap metric").

Array code for numpy or cupy (``xp``): per-point values from an (n, K) neighbour table sorted by
(distance, index), so that the first k columns are the exact k-NN for any k <= K (a k-sweep
needs one search at the largest k). Per class and bootstrap summaries run on the host.

Variants, per point (a point's k neighbours exclude itself):
- ``overlap``: 1.0 when at least one neighbour belongs to the other set, else 0.0;
- ``mixing``: (share of other-set neighbours) / 0.5, clipped to 1;
- ``pair`` (symmetric): 1.0 when the point's own twin (i <-> i + N) is among its neighbours;
  both twins look, each from its own neighbourhood;
- ``share``: the share of other-set points among the point's k nearest neighbours with its own
  twin left out (k + 1 searched; the first k that are not the twin). Linear in the neighbour
  labels, so a small k adds variance but no bias, and excluding the twin removes the one
  neighbour an attack of small budget always leaves next to the point.

Chance levels (:func:`chance`) are the values expected when the clean/perturbed labels of the
same map are assigned at random (N of each; for ``pair``, a random twin): for a point with k
neighbours among the 2N - 1 others, of which N carry the other label, the number of other-label
neighbours is hypergeometric, so ``overlap`` and ``mixing`` have closed forms and ``pair`` is
k / (2N - 1); ``share`` has exactly (N - 1) / (2N - 2) = 1/2 (its k neighbours come from the
2N - 2 points other than itself and its twin, N - 1 of them on the other side).
:func:`calibrated` divides by it (clipped to [0, 1]; 1 = random mixing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import hypergeom

from advlens.config import OVERLAP_VARIANTS as VARIANTS

TWIN_FREE = ("share",)  # variants that search one neighbour more and leave the twin out
AUTO_K_PER_SAMPLE = (
    0.01  # k = "auto": k = round(0.01 * N) = 0.5 % of the 2N points; N = 1,000 -> 10
)


def auto_k(n: int) -> int:
    """The ``overlap.k = "auto"`` rule: k proportional to the sample, ``max(1, round(N / 100))``
    (half up), so that N = 1,000 samples (2,000 points) give the paper-like k = 10.

    A fixed share of the points keeps the neighbourhood's reach on the map constant as N grows,
    which a fixed k does not (docs/design.md, "The overlap metric").
    """
    if n < 1:
        raise ValueError(f"auto_k needs at least one sample, got N = {n}")
    return max(1, min(int(AUTO_K_PER_SAMPLE * n + 0.5), 2 * n - 1))


def chance(variant: str, n: int, k: int, n_perturbed: int | None = None) -> float:
    """Expected value of ``variant`` with k neighbours when the clean/perturbed labels of the map
    are random: ``n`` clean and ``n_perturbed`` (default ``n``) perturbed points (analytic,
    hypergeometric; ``pair``: k / (2N - 1), the chance that a random other point is among k;
    ``share``: the other-set share among the points other than itself and its twin, 1/2 for
    N + N points)."""
    m = n if n_perturbed is None else n_perturbed
    total = n + m
    if variant == "pair":
        return k / (total - 1)
    if variant == "share":
        if total < 4:
            raise ValueError(f"share needs at least 2 samples (4 points), got {total} points")
        # clean point: m - 1 other-set among total - 2; perturbed point: n - 1 among total - 2
        return (n * (m - 1) + m * (n - 1)) / (total * (total - 2))
    if variant not in ("overlap", "mixing"):
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")

    h = np.arange(k + 1)
    out = 0.0
    for own, other in ((n, m), (m, n)):  # a clean point, then a perturbed one
        # other-label neighbours among k drawn from the total - 1 other points
        pmf = hypergeom(total - 1, other, k).pmf(h)
        v = 1.0 - pmf[0] if variant == "overlap" else np.sum(pmf * np.minimum(2.0 * h / k, 1.0))
        out += own / total * float(v)
    return out


def calibrated(value: float, chance_level: float) -> float:
    """``value / chance_level`` clipped to [0, 1]: 1 = as mixed as random labels, 0 = separated."""
    return float(min(1.0, max(0.0, value / chance_level))) if chance_level > 0 else float("nan")


def other_set(idx: Any, is_perturbed: Any, xp: Any = np) -> Any:
    """(n, K) bool: neighbour j of point i lies in the other set."""
    return is_perturbed[idx] != is_perturbed[:, None]


def per_point(variant: str, idx: Any, other: Any, k: int, xp: Any = np) -> Any:
    """Per-point values (n,) float64 of ``variant`` for the first ``k`` neighbours.

    ``pair`` and ``share`` assume the sample-order convention (clean 0..N-1, twin of i is
    i + N); ``share`` needs ``k + 1`` columns (its k neighbours once the twin is left out).
    """
    if variant == "overlap":
        return other[:, :k].any(axis=1).astype(xp.float64)
    if variant == "mixing":
        share = other[:, :k].sum(axis=1).astype(xp.float64) / k
        return xp.minimum(share / 0.5, 1.0)
    if variant == "pair":
        n = idx.shape[0] // 2
        twin = (xp.arange(2 * n) + n) % (2 * n)  # i <-> i + N
        return (idx[:, :k] == twin[:, None]).any(axis=1).astype(xp.float64)
    if variant == "share":
        if idx.shape[1] < k + 1:
            raise ValueError(
                f"share at k = {k} needs {k + 1} neighbour columns, got {idx.shape[1]}"
            )
        n = idx.shape[0] // 2
        twin = (xp.arange(2 * n) + n) % (2 * n)
        not_twin = idx[:, : k + 1] != twin[:, None]
        keep = not_twin & (xp.cumsum(not_twin, axis=1) <= k)  # the first k that are not the twin
        return (other[:, : k + 1] & keep).sum(axis=1).astype(xp.float64) / k
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
