"""Pieces every t-SNE engine shares, so that a parameter means the same thing in each.

- :func:`learning_rate`: ``"auto"`` is N / early_exaggeration (N/12 with the default), the
  Belkina et al. (2019) rule openTSNE uses, in openTSNE's units: its gradient leaves out the
  factor 4 of the textbook KL gradient (checked numerically against the analytic gradient),
  so scikit-learn, whose gradient keeps it, is given a quarter of the number.
- :func:`initial_positions`: PCA of the input scaled so that the first component has standard
  deviation 1e-4, plus 1% jitter (openTSNE's ``initialization.pca``), or N(0, 1e-4^2) noise.
- :func:`knn_graph`: the exact kNN graph of the input, computed once and handed to every engine
  that accepts one (k = 3 * perplexity + 1: openTSNE and cuML use the first 3 * perplexity
  columns, scikit-learn asks for one more).
- :func:`recall_at_k` and :func:`trustworthiness`: quality of a map on a sample of its points.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness as sk_trust
from sklearn.neighbors import NearestNeighbors

from advlens.embed.base import KnnGraph, TSNEParams
from advlens.errors import ConfigError

log = logging.getLogger(__name__)

INIT_STD = 1e-4  # scale of every initial map (openTSNE, scikit-learn and cuML agree on it)


def learning_rate(params: TSNEParams, n: int) -> float:
    """The learning rate in openTSNE's units: ``"auto"`` -> n / early_exaggeration."""
    if params.learning_rate == "auto":
        return float(n) / float(params.early_exaggeration)
    return float(params.learning_rate)


def k_neighbors(perplexity: float, n: int) -> int:
    """Neighbours the attractive forces use: 3 * perplexity (openTSNE, cuML, van der Maaten)."""
    return int(min(n - 1, int(3 * perplexity)))


def graph_columns(perplexity: float, n: int) -> int:
    """Columns of the shared kNN graph: 3 * perplexity + 1 (scikit-learn's count)."""
    return int(min(n - 1, int(3 * perplexity) + 1))


def initial_positions(x: np.ndarray, params: TSNEParams) -> np.ndarray:
    """The starting map (n, 2) float64 for ``params.init`` and ``params.seed``."""
    n = x.shape[0]
    rng = np.random.RandomState(params.seed)
    if params.init == "random":
        return INIT_STD * rng.standard_normal((n, 2))

    # Same recipe as openTSNE.initialization.pca: PCA (sign fixed by svd_flip), rescale so that
    # PC1 has std 1e-4, then jitter with 1% of that std so no two points coincide exactly.
    y = PCA(n_components=2, random_state=params.seed).fit_transform(np.asarray(x, np.float64))
    std = float(np.std(y[:, 0]))
    if not np.isfinite(std) or std == 0.0:
        log.info("PCA initialisation is degenerate (constant input); using random positions")
        return INIT_STD * rng.standard_normal((n, 2))
    y = y / std * INIT_STD
    y += rng.normal(0.0, INIT_STD * 0.01, y.shape)
    return np.ascontiguousarray(y)


def knn_graph(
    x: np.ndarray,
    k: int | None = None,
    *,
    perplexity: float = 30.0,
    n_jobs: int = -1,
    dtype: type[np.floating[Any]] = np.float32,
) -> KnnGraph:
    """Exact k nearest neighbours of every row of ``x`` (itself excluded), nearest first.

    Parameters
    ----------
    x : (n, d) array.
    k : neighbours per point; default :func:`graph_columns` (3 * perplexity + 1).
    dtype : distance dtype; float32 is the contract, float64 reproduces what openTSNE's exact
        search hands its affinity code bit for bit.

    Returns
    -------
    idx : (n, k) int64; dist : (n, k) Euclidean distances.
    """

    x = np.asarray(x)
    n = x.shape[0]
    k = graph_columns(perplexity, n) if k is None else int(k)
    if not 1 <= k < n:
        raise ConfigError(f"knn_graph: k = {k} needs 1 <= k < n = {n}")
    # The same search openTSNE's exact method runs (NearestNeighbors, algorithm auto, query
    # is the training set so each point's own entry is dropped).
    nn = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(x)
    dist, idx = nn.kneighbors()
    return idx.astype(np.int64, copy=False), dist.astype(dtype, copy=False)


def check_knn(knn: Any, n: int, k: int, engine: str) -> KnnGraph:
    """Validate a precomputed ``(idx, dist)`` graph and return its first ``k`` columns."""
    try:
        idx, dist = knn
    except (TypeError, ValueError):
        raise ConfigError(
            f"{engine}: knn must be a pair (idx (n, k) int64, dist (n, k) float32)"
        ) from None
    idx = np.asarray(idx)
    dist = np.asarray(dist)
    if idx.shape != dist.shape or idx.ndim != 2 or idx.shape[0] != n:
        raise ConfigError(
            f"{engine}: knn graph shapes {idx.shape} / {dist.shape} do not fit {n} points"
        )
    if idx.shape[1] < k:
        raise ConfigError(
            f"{engine}: the knn graph has {idx.shape[1]} neighbours per point but this "
            f"perplexity needs {k}; build it with advlens.embed.knn_graph(x, perplexity=...)"
        )
    return np.ascontiguousarray(idx[:, :k], dtype=np.int64), np.ascontiguousarray(dist[:, :k])


def _sample(n: int, size: int | None, seed: int) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _neighbours_of(points: np.ndarray, where: np.ndarray, data: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest rows of ``data`` to ``data[where]``, the point itself excluded."""

    nn = NearestNeighbors(n_neighbors=k + 1).fit(data)
    _, idx = nn.kneighbors(points)
    out = np.empty((len(where), k), dtype=np.int64)
    for row, (own, cand) in enumerate(zip(where, idx, strict=True)):
        keep = cand[cand != own]
        out[row] = keep[:k]  # a duplicate of the point may hide it: then drop the last one
    return out


def recall_at_k(
    x: np.ndarray,
    xy: np.ndarray,
    *,
    k: int = 10,
    sample: int | None = 1000,
    seed: int = 0,
) -> float:
    """kNN recall@k: share of each sampled point's k input-space neighbours kept in the map.

    Neighbours are searched among all points (exact), only the query points are sampled.
    """
    x = np.asarray(x, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64)
    n = x.shape[0]
    if xy.shape[0] != n:
        raise ValueError(f"recall_at_k: {n} input rows but {xy.shape[0]} map rows")
    if not 1 <= k < n:
        raise ValueError(f"recall_at_k: k = {k} needs 1 <= k < n = {n}")
    where = _sample(n, sample, seed)
    hi = _neighbours_of(x[where], where, x, k)
    lo = _neighbours_of(xy[where], where, xy, k)
    hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(hi, lo, strict=True))
    return float(hits) / float(len(where) * k)


def trustworthiness(
    x: np.ndarray,
    xy: np.ndarray,
    *,
    k: int = 10,
    sample: int | None = 1000,
    seed: int = 0,
) -> float:
    """scikit-learn's trustworthiness of the map on a random sample of ``sample`` points.

    The statistic is computed within the sample (neighbours and ranks among sampled points),
    which keeps it O(sample^2) at any N.
    """

    n = np.asarray(x).shape[0]
    where = _sample(n, sample, seed)
    m = len(where)
    k = min(k, (m - 1) // 2)  # scikit-learn requires k < m / 2
    if k < 1:
        raise ValueError(f"trustworthiness needs at least 4 sampled points, got {m}")
    return float(sk_trust(np.asarray(x)[where], np.asarray(xy)[where], n_neighbors=k))
