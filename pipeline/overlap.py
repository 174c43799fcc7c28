"""How much the clean and the perturbed point clouds overlap (docs/design.md, "The overlap metric").

On the 2-D map (:func:`overlap`, :func:`overlap_sweep`), on the reduced high-dimensional points
(:func:`overlap_highdim`, the t-SNE artefact check), and as the ROC AUC of a kNN detector that
tells perturbed from clean points (:func:`detector_auc`). Sample order convention: points are
``concat([clean (N), perturbed (N)])`` and the twin of point i < N is i + N; ``pair``, bootstrap
intervals and the detector's split rely on it.

Neighbour searches are exact (ties by index) and run where the points are: numpy on the CPU,
cupy / torch CUDA on the GPU; ``device="auto"`` also moves large host inputs to a usable GPU
(the results are the same).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import KNeighborsClassifier

from advlens._optional import has
from advlens.errors import ConfigError, DataError, closest
from advlens.kernels import knn, knn2d
from advlens.kernels._arrays import check_k, check_points, is_cupy, is_torch, to_numpy
from advlens.kernels.knn import place
from advlens.kernels.metrics import (
    TWIN_FREE,
    VARIANTS,
    auto_k,
    bootstrap_ci,
    calibrated,
    chance,
    other_set,
    per_class,
    per_point,
)

__all__ = [
    "Overlap",
    "detector_auc",
    "detector_folds",
    "overlap",
    "overlap_highdim",
    "overlap_highdim_sweep",
    "overlap_sweep",
    "resolve_k",
    "subsample_interval",
]


@dataclass(frozen=True, eq=False)
class Overlap:
    """One overlap statistic.

    ``value`` in [0, 1]; ``per_point`` (2N,) values in [0, 1] whose mean is ``value`` (for
    ``overlap``: 1.0 where the point overlaps, else 0.0); ``per_class``: mean per true label
    ({} without labels); ``ci``: bootstrap percentile interval or None; ``chance``: the value
    expected under random clean/perturbed labels of the same points; ``calibrated``:
    ``value / chance`` clipped to [0, 1] (1 = as mixed as random labels, 0 = separated).
    """

    value: float
    per_point: np.ndarray
    per_class: dict[int, float]
    k: int
    variant: str
    ci: tuple[float, float] | None = None
    chance: float = float("nan")
    calibrated: float = float("nan")

    def __post_init__(self) -> None:
        pp = self.per_point
        if not isinstance(pp, np.ndarray) or pp.ndim != 1 or pp.size == 0 or pp.dtype.kind != "f":
            raise ValueError(f"Overlap.per_point must be a non-empty 1-D float array, got {pp!r}")
        if not bool(((pp >= 0) & (pp <= 1)).all()):
            raise ValueError("Overlap.per_point values must lie in [0, 1]")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"Overlap.value = {self.value}: must lie in [0, 1]")
        if self.k < 1 or self.variant not in VARIANTS:
            raise ValueError(f"Overlap k = {self.k}, variant = {self.variant!r}: invalid")
        if any(not 0.0 <= v <= 1.0 for v in self.per_class.values()):
            raise ValueError(f"Overlap.per_class values must lie in [0, 1]: {self.per_class}")
        if self.ci is not None and (len(self.ci) != 2 or not 0 <= self.ci[0] <= self.ci[1] <= 1):
            raise ValueError(
                f"Overlap.ci = {self.ci}: must be (low, high) with 0 <= low <= high <= 1"
            )


def overlap(
    xy: Any,
    is_perturbed: Any,
    *,
    k: int | str = 10,
    variant: str = "overlap",
    labels: Any = None,
    bootstrap: int = 0,
    seed: int = 0,
    device: str = "auto",
) -> Overlap:
    """Overlap of the clean and perturbed points of a 2-D map.

    Parameters
    ----------
    xy : (n, 2) points (numpy, cupy or torch), clean and perturbed together.
    is_perturbed : (n,) bool (or 0/1).
    k : neighbours per point, ``1 <= k <= n - 1``, or "auto" (:func:`resolve_k`).
    variant : "overlap", "mixing", "pair" or "share" ("pair" and "share" need the sample-order
        convention).
    labels : true label per point (n,) or per sample (n/2,); gives ``per_class``.
    bootstrap : resamples for a 95% interval (samples drawn with their twins; 0: none).
    seed : seed of the bootstrap.
    device : "auto", "cpu" or "cuda" (where host inputs are searched).
    """
    k = resolve_k(k, int(np.shape(xy)[0]) // 2)
    out = overlap_sweep(
        xy, is_perturbed, ks=(k,), variants=(variant,), labels=labels,
        bootstrap=bootstrap, seed=seed, device=device,
    )  # fmt: skip
    return out[(variant, k)]


def overlap_sweep(
    xy: Any,
    is_perturbed: Any,
    *,
    ks: Sequence[int] = (5, 10, 20, 50),
    variants: Sequence[str] = VARIANTS,
    labels: Any = None,
    bootstrap: int = 0,
    seed: int = 0,
    device: str = "auto",
) -> dict[tuple[str, int], Overlap]:
    """Every (variant, k) of the sweep from one neighbour search at ``max(ks)``.

    Returns ``{(variant, k): Overlap}`` in the order of ``variants`` then ``ks``. Other arguments
    as in :func:`overlap`.
    """
    pts = _points(xy, 2)
    return _score(pts, is_perturbed, ks, variants, labels, bootstrap, seed, device, knn2d, "knn2d")


def overlap_highdim(
    x: Any,
    is_perturbed: Any,
    *,
    k: int | str = 10,
    variant: str = "overlap",
    labels: Any = None,
    device: str = "auto",
) -> Overlap:
    """The same statistic on (n, d) points (the reduced activations): exact kNN in d dimensions.

    Compared with the map's value it flags t-SNE artefacts. Arguments as in :func:`overlap`.
    """
    k = resolve_k(k, int(np.shape(x)[0]) // 2)
    out = overlap_highdim_sweep(x, is_perturbed, ks=(k,), variants=(variant,), labels=labels,
                                device=device)  # fmt: skip
    return out[(variant, k)]


def overlap_highdim_sweep(
    x: Any,
    is_perturbed: Any,
    *,
    ks: Sequence[int] = (5, 10, 20, 50),
    variants: Sequence[str] = VARIANTS,
    labels: Any = None,
    device: str = "auto",
) -> dict[tuple[str, int], Overlap]:
    """:func:`overlap_sweep` on (n, d) points: every (variant, k) from one exact search."""
    pts = _points(x, None)
    return _score(pts, is_perturbed, ks, variants, labels, 0, 0, device, knn, "knn")


def detector_auc(x: Any, is_perturbed: Any, *, k: int = 10, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated ROC AUC of a k-nearest-neighbour detector of perturbed points.

    ``folds``-fold cross-validation grouped by sample (:func:`detector_folds`: a clean point and
    its twin always fall in the same fold, so the detector never sees the twin of a point it
    scores); a ``KNeighborsClassifier(k)`` fitted on the other folds scores each fold, and the
    value is the mean of the fold AUCs. ``seed`` shuffles the folds (its own seed, not the
    map's). 0.5: indistinguishable to it; 1: perfectly separable. The points are used as given:
    the layer task's PCA is label-blind (fitted on clean and perturbed points without their
    flags), so fitting it on all folds leaks no label (docs/design.md, "The overlap metric").
    """

    pts = to_numpy(x)
    check_points(pts, np, None)
    pts = pts.astype(np.float64, copy=False)
    flags = _flags(is_perturbed, pts.shape[0])
    _require_pairs(flags, "detector_auc")
    n = pts.shape[0] // 2
    if not 2 <= folds <= n:
        raise ConfigError(f"folds = {folds}: use 2 <= folds <= N = {n} samples")
    aucs = []
    for train, test in detector_folds(n, folds, seed):
        if not 1 <= k <= train.size:
            raise ConfigError(
                f"k = {k}: the detector trains on {train.size} points ({folds - 1} of {folds} "
                f"folds with their twins); use 1 <= k <= {train.size}"
            )
        model = KNeighborsClassifier(n_neighbors=k).fit(pts[train], flags[train])
        score = model.predict_proba(pts[test])[:, list(model.classes_).index(True)]
        aucs.append(roc_auc_score(flags[test], score))
    return float(np.mean(aucs))


def detector_folds(n: int, folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) point indices of ``folds`` folds over 2N points, grouped by sample (point i
    and its twin i + N share group i; scikit-learn's ``GroupKFold``, shuffled by ``seed``)."""

    groups = np.tile(np.arange(n), 2)
    cv = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros((2 * n, 1)), groups=groups))


def resolve_k(k: int | str, n: int) -> int:
    """The k of ``overlap.k`` for N samples: an integer as given, "auto" by
    :func:`advlens.kernels.metrics.auto_k` (N / 100, so N = 1,000 gives 10)."""
    if k == "auto":
        return auto_k(n)
    if isinstance(k, str):
        raise ConfigError(f"k = {k!r}: give an integer >= 1 or 'auto'")
    return k


def subsample_interval(
    xy: Any,
    *,
    k: int,
    variant: str = "overlap",
    draws: int = 200,
    seed: int = 0,
    level: float = 0.95,
    device: str = "auto",
) -> dict[str, tuple[float, float]]:
    """Intervals of the raw (``"value"``) and the calibrated (``"calibrated"``) value over
    half-samples of the images, neighbours recomputed (of value / chance, unclipped: the raw
    value of a subset is scored at a smaller k, so only the ratio is comparable; the raw
    interval is that of the ratio times the full sample's chance level).

    ``xy``: the (2N, d) points the value is scored on, the map (d = 2) or the reduced points.
    Each draw takes m = N/2 samples without replacement (each with its twin), finds the
    neighbours among those points again, with k scaled to the subset (``max(1, round(k m /
    N))``, the auto rule's proportion) and scores them. The subset's exact neighbours are read
    from one wider search of all points (:func:`_subset_neighbours`; a draw it cannot serve is
    searched again). For a mean-like statistic the draws spread around their mean with
    Var(v_m) = (1/m - 1/N) s^2 = Var(v_N) at m = N/2, so the interval is
    ``v_N - quantiles(v_m - mean(v_m))`` (half-sampling); centred on the draws' own mean, so
    that a subset scored at its smaller k (whose value may sit apart from the full sample's)
    does not shift it. It covers which images were attacked; t-SNE's own variability comes
    from repeat seeds (docs/design.md).
    """
    pts = to_numpy(_points(xy, None)).astype(np.float64, copy=False)
    search, what = (knn2d, "knn2d") if pts.shape[1] == 2 else (knn, "knn")
    n = pts.shape[0] // 2
    m = n // 2
    if m < 2 or draws < 1:
        raise ConfigError(f"subsample_interval needs N >= 4 samples and draws >= 1 (N = {n})")
    flags = np.repeat([False, True], n)
    full = _score(pts, flags, (k,), (variant,), None, 0, 0, device, search, what)[(variant, k)]
    extra = int(variant in TWIN_FREE)
    km = max(1, min(int(k * m / n + 0.5), 2 * m - 1 - extra))
    q = km + extra  # neighbour columns a subset point needs
    # each other point is in a half-sample with probability 1/2: 2q + 12 sqrt(q) + 20 columns
    # hold q of them but for a chance far below one in a million per point
    wide = min(2 * n - 1, 2 * q + int(12 * np.sqrt(q)) + 20)
    idx = np.asarray(to_numpy(search(place(pts, device, what), wide)[0]))
    rng = np.random.default_rng(seed)
    vals = np.empty(draws)
    sub_flags = np.repeat([False, True], m)
    for d in range(draws):
        pick = np.sort(rng.choice(n, m, replace=False))
        table = _subset_neighbours(idx, pick, n, q)
        if table is None:  # a point with too few subset members among its columns: search
            table = np.asarray(to_numpy(search(pts[np.concatenate([pick, pick + n])], q)[0]))
        o = per_point(variant, table, other_set(table, sub_flags), km)
        vals[d] = float(o.mean()) / chance(variant, m, km)
    tail = (1.0 - level) / 2.0
    ratio = full.value / full.chance
    q_lo, q_hi = np.quantile(vals - vals.mean(), [tail, 1.0 - tail])
    lo, hi = ratio - q_hi, ratio - q_lo
    return {
        "value": (float(np.clip(lo * full.chance, 0, 1)), float(np.clip(hi * full.chance, 0, 1))),
        "calibrated": (float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1))),
    }


def _subset_neighbours(idx: np.ndarray, pick: np.ndarray, n: int, q: int) -> np.ndarray | None:
    """The exact q-neighbour table of the half-sample ``pick`` (sorted sample indices; points
    ``pick`` then ``pick + n``, renumbered 0..2m-1) read from the all-points table ``idx``
    (2n, K), or None when a subset point has fewer than q subset members among its K columns.

    ``idx`` is sorted by (distance, index) and the renumbering keeps the index order, so the
    first q subset members of a row are the subset's own q nearest, ties by index.
    """
    pts = np.concatenate([pick, pick + n])
    where = np.full(2 * n, -1)
    where[pts] = np.arange(pts.size)
    rows = where[idx[pts]]  # (2m, K): subset number of each neighbour, -1 outside
    inside = rows >= 0
    if int(inside.sum(axis=1).min()) < q:
        return None
    first = np.argsort(~inside, axis=1, kind="stable")[:, :q]  # the first q inside, in order
    return np.take_along_axis(rows, first, axis=1)


# -- helpers -----------------------------------------------------------------------------


def _points(x: Any, dims: int | None) -> Any:
    """Validated (n, dims) points, left on their device."""
    if is_torch(x):
        x = x.detach()
        check_points(x, sys.modules["torch"], dims)
    elif is_cupy(x):
        check_points(x, sys.modules["cupy"], dims)
    else:
        x = np.asarray(x)
        check_points(x, np, dims)
    return x


def _on_device(idx: Any) -> tuple[Any, Any]:
    """Neighbour table as numpy, or cupy when it lives on a GPU and cupy is installed."""
    if is_cupy(idx):
        return idx, sys.modules["cupy"]
    if is_torch(idx):
        if idx.is_cuda and has("cupy"):
            cp = sys.modules["cupy"]
            return cp.from_dlpack(idx), cp
        return idx.cpu().numpy(), np
    return np.asarray(idx), np


def _flags(is_perturbed: Any, n: int) -> np.ndarray:
    """Validated host bool (n,) array with both sets present."""
    f = to_numpy(is_perturbed)
    if f.shape != (n,):
        raise DataError(f"is_perturbed has shape {f.shape}: expected ({n},), one flag per point")
    if f.dtype != np.bool_:
        if f.dtype.kind not in "iu" or not np.isin(f, (0, 1)).all():
            raise DataError(f"is_perturbed has dtype {f.dtype}: expected bool (or 0/1 integers)")
        f = f.astype(bool)
    n_pert = int(f.sum())
    if n_pert in (0, n):
        raise DataError(
            f"is_perturbed marks {n_pert} of {n} points as perturbed: both clean and perturbed "
            "points are needed"
        )
    return f


def _is_pairs(flags: np.ndarray) -> bool:
    n = flags.shape[0] // 2
    return flags.shape[0] == 2 * n and not flags[:n].any() and bool(flags[n:].all())


def _require_pairs(flags: np.ndarray, what: str) -> None:
    if not _is_pairs(flags):
        raise ConfigError(
            f"{what} needs the sample-order convention (N clean points, then their N perturbed "
            f"twins in the same order: is_perturbed = [False]*N + [True]*N); got "
            f"{int((~flags).sum())} clean and {int(flags.sum())} perturbed points in another order"
        )


def _labels(labels: Any, flags: np.ndarray) -> np.ndarray | None:
    if labels is None:
        return None
    lab = to_numpy(labels)
    n = flags.shape[0]
    if lab.ndim == 1 and lab.shape[0] == n // 2 and _is_pairs(flags):
        lab = np.concatenate([lab, lab])  # per sample -> per point (twins share the label)
    if lab.shape != (n,):
        raise DataError(
            f"labels have shape {lab.shape}: expected ({n},) per point or ({n // 2},) per sample"
        )
    return lab


def _score(arr, is_perturbed, ks, variants, labels, bootstrap, seed, device, search, what):
    n = int(arr.shape[0])
    flags = _flags(is_perturbed, n)
    ks = [check_k(k, n) for k in ks]
    if not ks:
        raise ConfigError("ks is empty: give at least one k")
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"overlap variant {v!r} is unknown; {closest(str(v), VARIANTS)}")
    for v in ("pair", *TWIN_FREE):
        if v in variants:
            _require_pairs(flags, f"the {v!r} variant")
    extra = int(any(v in TWIN_FREE for v in variants))  # one more neighbour: the twin left out
    if extra and max(ks) > n - 2:
        raise ConfigError(
            f"k = {max(ks)}: the 'share' variant leaves out the point and its twin, so it has "
            f"{n - 2} other points (n = {n}); use k <= {n - 2}"
        )
    if bootstrap < 0:
        raise ConfigError(f"bootstrap = {bootstrap}: must be >= 0 (0 turns it off)")
    if bootstrap:
        _require_pairs(flags, "the bootstrap interval")
    lab = _labels(labels, flags)
    idx, xp = _on_device(search(place(arr, device, what), max(ks) + extra)[0])
    other = other_set(idx, xp.asarray(flags), xp)
    out = {}
    for v in variants:
        for k in ks:
            pp = to_numpy(per_point(v, idx, other, k, xp)).astype(np.float64)
            ci = bootstrap_ci(pp, bootstrap, seed) if bootstrap else None
            c = chance(v, int((~flags).sum()), k, int(flags.sum()))
            val = float(pp.mean())
            out[(v, k)] = Overlap(val, pp, per_class(pp, lab), k, v, ci, c, calibrated(val, c))
    return out
