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

from advlens._optional import has
from advlens.errors import ConfigError, DataError, closest
from advlens.kernels import knn, knn2d
from advlens.kernels._arrays import check_k, check_points, is_cupy, is_torch, to_numpy
from advlens.kernels.knn import place
from advlens.kernels.metrics import VARIANTS, bootstrap_ci, other_set, per_class, per_point

__all__ = ["Overlap", "detector_auc", "overlap", "overlap_highdim", "overlap_sweep"]


@dataclass(frozen=True, eq=False)
class Overlap:
    """One overlap statistic.

    ``value`` in [0, 1]; ``per_point`` (2N,) values in [0, 1] whose mean is ``value`` (for
    ``overlap``: 1.0 where the point overlaps, else 0.0); ``per_class``: mean per true label
    ({} without labels); ``ci``: bootstrap percentile interval or None.
    """

    value: float
    per_point: np.ndarray
    per_class: dict[int, float]
    k: int
    variant: str
    ci: tuple[float, float] | None = None

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
    k: int = 10,
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
    k : neighbours per point, ``1 <= k <= n - 1``.
    variant : "overlap", "mixing" or "pair" ("pair" needs the sample-order convention).
    labels : true label per point (n,) or per sample (n/2,); gives ``per_class``.
    bootstrap : resamples for a 95% interval (samples drawn with their twins; 0: none).
    seed : seed of the bootstrap.
    device : "auto", "cpu" or "cuda" (where host inputs are searched).
    """
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
    k: int = 10,
    variant: str = "overlap",
    labels: Any = None,
    device: str = "auto",
) -> Overlap:
    """The same statistic on (n, d) points (the reduced activations): exact kNN in d dimensions.

    Compared with the map's value it flags t-SNE artefacts. Arguments as in :func:`overlap`.
    """
    pts = _points(x, None)
    out = _score(pts, is_perturbed, (k,), (variant,), labels, 0, 0, device, knn, "knn")
    return out[(variant, k)]


def detector_auc(x: Any, is_perturbed: Any, *, k: int = 10, seed: int = 0) -> float:
    """ROC AUC of a k-nearest-neighbour detector of perturbed points.

    The N samples are split in two halves (seeded; a clean point and its twin stay in the same
    half); a ``KNeighborsClassifier(k)`` fitted on one half scores the other. 0.5: clean and
    perturbed points are indistinguishable to it; 1: perfectly separable.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import KNeighborsClassifier

    pts = to_numpy(x)
    check_points(pts, np, None)
    pts = pts.astype(np.float64, copy=False)
    flags = _flags(is_perturbed, pts.shape[0])
    _require_pairs(flags, "detector_auc")
    n = pts.shape[0] // 2
    if n < 4:
        raise DataError(f"detector_auc needs at least 4 samples (8 points), got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    train, test = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    train, test = np.concatenate([train, train + n]), np.concatenate([test, test + n])
    if not 1 <= k <= train.size:
        raise ConfigError(
            f"k = {k}: the detector trains on {train.size} points (half the samples with their "
            f"twins); use 1 <= k <= {train.size}"
        )
    model = KNeighborsClassifier(n_neighbors=k).fit(pts[train], flags[train])
    score = model.predict_proba(pts[test])[:, list(model.classes_).index(True)]
    return float(roc_auc_score(flags[test], score))


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
    if "pair" in variants:
        _require_pairs(flags, "the 'pair' variant")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap = {bootstrap}: must be >= 0 (0 turns it off)")
    if bootstrap:
        _require_pairs(flags, "the bootstrap interval")
    lab = _labels(labels, flags)
    idx, xp = _on_device(search(place(arr, device, what), max(ks))[0])
    other = other_set(idx, xp.asarray(flags), xp)
    out = {}
    for v in variants:
        for k in ks:
            pp = to_numpy(per_point(v, idx, other, k, xp)).astype(np.float64)
            ci = bootstrap_ci(pp, bootstrap, seed) if bootstrap else None
            out[(v, k)] = Overlap(float(pp.mean()), pp, per_class(pp, lab), k, v, ci)
    return out
