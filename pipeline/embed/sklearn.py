"""scikit-learn engine: ``sklearn.manifold.TSNE`` (Barnes-Hut, angle 0.5).

Mapping of :class:`advlens.embed.TSNEParams`:

- perplexity -> ``perplexity``; scikit-learn uses min(n - 1, 3 * perplexity + 1) neighbours.
- n_iter (total, exaggeration included) -> ``max_iter`` (``n_iter`` before scikit-learn 1.5);
  scikit-learn refuses fewer than 250, so n_iter < 250 raises ConfigError. Early stopping is
  switched off (``n_iter_without_progress = n_iter``, ``min_grad_norm = 0``) because the other
  engines always run every iteration.
- early_exaggeration -> ``early_exaggeration``; early_exaggeration_iter -> the class constant
  ``_EXPLORATION_MAX_ITER`` (fixed at 250 in scikit-learn), set on a subclass when it differs.
- learning_rate: scikit-learn's gradient carries the factor 4 of the KL gradient that
  openTSNE's and cuML's leave out, so the shared rate eta (openTSNE units; "auto" = N/12) is
  passed as ``learning_rate = eta / 4``. (scikit-learn's own "auto", max(N / EE / 4, 50), is
  the same rule in its units, with a floor.) The rate is the same in both phases.
- momentum 0.5 then 0.8: scikit-learn's fixed schedule, which every engine here uses.
- init "pca"/"random" -> the shared array from :func:`_common.initial_positions` (same start
  as the other engines), seed -> ``random_state``.
- n_jobs -> ``n_jobs`` (neighbour search) and an OpenMP thread limit for the gradient.
- A precomputed graph is passed as a sparse distance matrix (``metric="precomputed"``) with
  each point's own zero-distance entry first, the layout ``KNeighborsTransformer`` produces.
- When 3 * perplexity neighbours cover every point (tiny n) the ``exact`` method is used:
  its affinities are then the same and it is cheap.
"""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import scipy.sparse as sp
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from advlens._optional import has
from advlens.embed import _common
from advlens.embed.base import Embedding, KnnGraph, TSNEParams
from advlens.errors import ConfigError

NAME = "sklearn"
MIN_ITER = 250  # scikit-learn's lower bound on max_iter
log = logging.getLogger(__name__)


def available() -> bool:
    return has("sklearn.manifold")


def _tsne_class(ee_iter: int):
    fixed = getattr(TSNE, "_EXPLORATION_MAX_ITER", None)
    if ee_iter == (fixed if fixed is not None else 250):
        return TSNE
    if fixed is None:
        raise ConfigError(
            f"engine sklearn: this scikit-learn fixes early exaggeration at 250 iterations; "
            f"embed.early_exaggeration_iter = {ee_iter} cannot be honoured"
        )
    return type("AdvlensTSNE", (TSNE,), {"_EXPLORATION_MAX_ITER": int(ee_iter)})


def _precomputed(idx: np.ndarray, dist: np.ndarray):
    n, k = idx.shape
    cols = np.concatenate([np.arange(n)[:, None], idx], axis=1).ravel()
    vals = np.concatenate([np.zeros((n, 1)), dist.astype(np.float64)], axis=1).ravel()
    return sp.csr_matrix((vals, cols, np.arange(0, n * (k + 1) + 1, k + 1)), shape=(n, n))


def embed(x: np.ndarray, params: TSNEParams, *, knn: KnnGraph | None = None) -> Embedding:
    if params.n_iter < MIN_ITER:
        raise ConfigError(
            f"engine sklearn: embed.n_iter = {params.n_iter}; scikit-learn needs at least "
            f"{MIN_ITER} iterations (use another engine for shorter runs)"
        )
    t0 = time.perf_counter()
    n = x.shape[0]
    eta = _common.learning_rate(params, n)
    exact = n - 1 <= _common.k_neighbors(params.perplexity, n)
    cls = _tsne_class(params.early_exaggeration_iter)
    iter_key = "max_iter" if "max_iter" in inspect.signature(cls).parameters else "n_iter"
    kwargs = {
        "n_components": 2,
        "perplexity": params.perplexity,
        "early_exaggeration": params.early_exaggeration,
        "learning_rate": eta / 4.0,
        iter_key: params.n_iter,
        "n_iter_without_progress": params.n_iter,
        "min_grad_norm": 0.0,
        "init": _common.initial_positions(x, params).astype(np.float32),
        "random_state": params.seed,
        "method": "exact" if exact else "barnes_hut",
        "angle": 0.5,
        "n_jobs": params.n_jobs,
    }
    data = x
    knn_seconds = None
    if knn is not None and not exact:
        need = _common.graph_columns(params.perplexity, n)
        idx, dist = _common.check_knn(knn, n, need, NAME)
        data = _precomputed(idx, dist)
        kwargs["metric"] = "precomputed"
        knn_seconds = 0.0
    limit = params.n_jobs if params.n_jobs > 0 else None
    with threadpool_limits(limits=limit, user_api="openmp"):
        xy = cls(**kwargs).fit_transform(data)
    seconds = time.perf_counter() - t0
    effective = params.to_dict() | {
        "learning_rate": eta,
        "sklearn_learning_rate": eta / 4.0,
        "method": kwargs["method"],
        "knn": "precomputed" if kwargs.get("metric") == "precomputed" else "internal",
    }
    return Embedding(
        xy=np.ascontiguousarray(xy, dtype=np.float32),
        seconds=seconds,
        engine=NAME,
        params=effective,
        knn_seconds=knn_seconds,
    )
