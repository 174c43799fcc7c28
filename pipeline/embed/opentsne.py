"""openTSNE engine, through its affinity + ``TSNEEmbedding`` API so that the neighbour search
and the optimisation are timed apart and a precomputed kNN graph can be used.

Mapping of :class:`advlens.embed.TSNEParams`:

- perplexity -> ``affinity.PerplexityBasedNN(perplexity=...)`` on k = min(n - 1, 3 * perplexity)
  neighbours. Without a graph the neighbours come from openTSNE's own search (``method="auto"``:
  exact below 1,000 points, Annoy above, seeded), timed as ``knn_seconds``; with one, its first
  k columns go in through ``nearest_neighbors.PrecomputedNeighbors``.
- n_iter (total) -> ``optimize(n_iter=early_exaggeration_iter, exaggeration=early_exaggeration,
  momentum=0.5)`` then ``optimize(n_iter=n_iter - early_exaggeration_iter, momentum=0.8)``.
  (openTSNE's ``TSNE(n_iter=...)`` counts only the second phase, and its default momentum is
  0.8 in both; the classic 0.5/0.8 schedule is set so that all engines agree.)
- learning_rate -> ``learning_rate`` as a number in both phases: openTSNE's own "auto" is
  N / exaggeration per phase (N/12, then N); the shared "auto" keeps N / early_exaggeration.
  openTSNE's gradient is the KL gradient divided by 4 (the unit every advlens rate is in).
- init -> the shared array of :func:`_common.initial_positions` (openTSNE's PCA recipe).
- seed -> ``random_state`` (Annoy, jitter); n_jobs -> ``n_jobs``.
- negative gradient: openTSNE's ``auto`` (Barnes-Hut below 10,000 points, FFT above);
  ``max_step_norm`` = 5 and no gradient clipping, openTSNE's defaults.
"""

from __future__ import annotations

import time

import numpy as np
from openTSNE import TSNEEmbedding, affinity, nearest_neighbors

from advlens._optional import has, require
from advlens.embed import _common
from advlens.embed.base import Embedding, KnnGraph, TSNEParams

NAME = "opentsne"


def available() -> bool:
    return has("openTSNE")


def embed(x: np.ndarray, params: TSNEParams, *, knn: KnnGraph | None = None) -> Embedding:
    require("openTSNE", "the opentsne t-SNE engine")

    t0 = time.perf_counter()
    n = x.shape[0]
    k = _common.k_neighbors(params.perplexity, n)
    if knn is None:
        index = affinity.get_knn_index(
            x, "auto", k, "euclidean", n_jobs=params.n_jobs, random_state=params.seed
        )
        idx, dist = index.build()
        knn_seconds = time.perf_counter() - t0
        source = type(index).__name__.lower()
    else:
        idx, dist = _common.check_knn(knn, n, k, NAME)
        knn_seconds = 0.0
        source = "precomputed"
    aff = affinity.PerplexityBasedNN(
        perplexity=params.perplexity,
        knn_index=nearest_neighbors.PrecomputedNeighbors(idx, dist),
        n_jobs=params.n_jobs,
    )
    eta = _common.learning_rate(params, n)
    emb = TSNEEmbedding(
        _common.initial_positions(x, params),
        aff,
        negative_gradient_method="auto",
        random_state=params.seed,
        n_jobs=params.n_jobs,
        learning_rate=eta,
        max_grad_norm=None,
        max_step_norm=5,
    )
    ee_iter = params.early_exaggeration_iter
    if ee_iter > 0:
        emb = emb.optimize(
            n_iter=ee_iter, exaggeration=params.early_exaggeration, momentum=0.5,
            learning_rate=eta,
        )  # fmt: skip
    if params.n_iter > ee_iter:
        emb = emb.optimize(
            n_iter=params.n_iter - ee_iter, exaggeration=1.0, momentum=0.8, learning_rate=eta
        )
    seconds = time.perf_counter() - t0
    return Embedding(
        xy=np.ascontiguousarray(emb, dtype=np.float32),
        seconds=seconds,
        engine=NAME,
        params=params.to_dict()
        | {"learning_rate": eta, "k_neighbors": k, "knn": source, "kl": float(emb.kl_divergence)},
        knn_seconds=knn_seconds,
    )
