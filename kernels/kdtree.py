"""Exact 2-D kNN through SciPy's cKDTree (all cores), with the grid reference's semantics.

cKDTree is multi-threaded and beats the single-threaded NumPy reference on machines with several
cores, but breaks distance ties in no documented order and rounds distances its own way. So:
ask it for k + 2 neighbours; where the (k+2)-th is clearly farther than the (k+1)-th (the point
itself included), its k + 1 are the true ones, and their squared distances are recomputed as the
reference does (``dx*dx + dy*dy``) and sorted by (distance, index). The other rows (ties at the
boundary, many duplicates) go to the grid reference. The results are bit-identical to it.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from advlens.kernels.grid import knn2d_reference

TIE_MARGIN = 1e-9  # relative gap that cKDTree's rounding cannot close


def knn2d_kdtree(xy: np.ndarray, k: int, *, workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and results as :func:`advlens.kernels.grid.knn2d_reference`."""

    x = np.ascontiguousarray(xy, dtype=np.float64)
    n = x.shape[0]
    m = min(k + 2, n)
    dist, cand = cKDTree(x).query(x, m, workers=workers)
    if m == k + 2:
        unsure = dist[:, k + 1] <= dist[:, k] * (1 + TIE_MARGIN)
        cand = cand[:, : k + 1]
    else:  # k = n - 1: every point is listed
        unsure = np.zeros(n, bool)
    dx = x[cand, 0] - x[:, :1]
    d2 = dx * dx
    dy = x[cand, 1] - x[:, 1:]
    d2 += dy * dy
    o = np.lexsort((cand, d2), axis=1)
    cand = np.take_along_axis(cand, o, axis=1)
    d2 = np.take_along_axis(d2, o, axis=1)
    keep = cand != np.arange(n)[:, None]
    unsure |= keep.all(axis=1)  # the point itself not listed: duplicates beyond k + 1
    keep[unsure] = False
    keep[unsure, :k] = True  # placeholder rows, overwritten below
    idx = cand[keep].reshape(n, k)
    d2 = d2[keep].reshape(n, k)
    dist = np.sqrt(d2)
    rows = np.flatnonzero(unsure)
    if rows.size:
        idx[rows], dist[rows] = knn2d_reference(x, k, queries=rows)
    return idx, dist
