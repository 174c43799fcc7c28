"""advlens' own t-SNE engine in PyTorch (``advlens.kernels.tsne``): on a CUDA GPU when one is
present, else on the CPU (slowly; ``auto`` then picks openTSNE).

Mapping of :class:`advlens.embed.TSNEParams`:

- perplexity -> kNN on the device (k = min(n - 1, 3 * perplexity)): exact (blocked, float64
  re-ranked, certified) up to ``kernels.tsne.EXACT_KNN_MAX_N`` points, IVF (recall >= 0.99)
  above; ``params["knn"]`` records which ran. Per-point bandwidth by vectorised bisection, P = (P + P^T) / 2 normalised
  to 1; a precomputed ``knn`` graph replaces the search (its first k columns are used).
- n_iter (total), early_exaggeration, early_exaggeration_iter -> the two phases, momentum 0.5
  then 0.8, gains and ``max_step_norm`` = 5 as openTSNE, no gradient clipping.
- learning_rate -> the shared rule (``"auto"`` = N / early_exaggeration, openTSNE's units).
- init -> openTSNE's PCA recipe computed on the device with the same jitter as the other
  engines (``_common.initial_positions``), or the same random start.
- seed -> the init noise; the optimisation itself has no randomness and is repeatable bit for
  bit on one device. n_jobs -> CPU threads while the engine runs on the CPU (ignored on a GPU).
- repulsion: exact (tiled) up to ``EXACT_MAX_N`` points, FFT interpolation (FIt-SNE) above.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from advlens._env import resolve_device
from advlens._optional import has
from advlens.embed import _common
from advlens.embed.base import Embedding, KnnGraph, TSNEParams
from advlens.kernels import tsne as T

NAME = "torch"
log = logging.getLogger(__name__)


def available() -> bool:
    """True when PyTorch imports (the engine also runs on the CPU)."""

    return has("torch")


def embed(
    x: np.ndarray,
    params: TSNEParams,
    *,
    knn: KnnGraph | None = None,
    device: str | None = None,
) -> Embedding:
    """Embed ``x`` (n, d) with ``params``; ``knn`` an optional (idx, dist) graph."""

    dev = resolve_device(device or "auto")
    threads = torch.get_num_threads()
    if dev.type == "cpu" and params.n_jobs > 0:
        torch.set_num_threads(params.n_jobs)
    try:
        t0 = time.perf_counter()
        n = x.shape[0]
        k = _common.k_neighbors(params.perplexity, n)
        xt = torch.tensor(np.asarray(x, dtype=np.float32), device=dev)
        if knn is None:
            idx_t, dist_t, source = T.knn_graph(xt, k, seed=params.seed)
            graph = (idx_t, dist_t)
            T.synchronize(dev)
            knn_seconds = time.perf_counter() - t0
        else:
            idx, dist = _common.check_knn(knn, n, k, NAME)
            graph = (
                torch.tensor(idx, device=dev),
                torch.tensor(dist, dtype=torch.float32, device=dev),
            )
            knn_seconds, source = 0.0, "precomputed"
        P = T.calibrate(*graph, params.perplexity)
        y0 = T.pca_init(xt, params.seed, params.init)
        eta = _common.learning_rate(params, n)
        method = T.choose_method(n)
        y, kl = T.optimize(
            y0,
            P,
            n_iter=params.n_iter,
            early_exaggeration_iter=params.early_exaggeration_iter,
            early_exaggeration=params.early_exaggeration,
            learning_rate=eta,
            method=method,
        )
        xy = y.cpu().numpy().astype(np.float32, copy=False)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    log.debug("torch t-SNE: n=%d on %s, %s repulsion, KL %.4f", n, dev, method, kl[-1][1])
    extra = {
        "learning_rate": eta,
        "k_neighbors": k,
        "knn": source,
        "device": str(dev),
        "repulsion": method,
        "effective_perplexity": P.perplexity,
        "kl": float(kl[-1][1]),
    }
    return Embedding(
        xy=xy, seconds=seconds, engine=NAME, params=params.to_dict() | extra,
        knn_seconds=knn_seconds,
    )  # fmt: skip
