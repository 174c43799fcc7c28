"""RAPIDS cuML engine: ``cuml.manifold.TSNE`` with the FFT method, on a CUDA GPU.

Install with ``pip install cuml-cu12`` from NVIDIA's package index (or
``cuml-cu13``). Mapping of :class:`advlens.embed.TSNEParams` (cuML's documented API):

- ``learning_rate_method=None``: cuML's default "adaptive" mode replaces the learning rate,
  the early exaggeration (24 above 10,000 points) and the neighbour count by its own
  size-based choices, so it is switched off for a fair comparison.
- perplexity -> ``perplexity``; ``n_neighbors`` set explicitly to min(n - 1, 3 * perplexity)
  (cuML's default of 90 only matches perplexity 30), ``square_distances=True`` (Euclidean
  distances squared, as every engine here does), ``perplexity_max_iter`` left at 100.
- n_iter (total) -> ``max_iter`` (``n_iter`` in cuML releases before 25.x; 25.12 keeps a
  deprecated ``n_iter`` that warns, so ``max_iter`` wins whenever the class accepts it);
  ``min_grad_norm=0`` so it never stops early (the other engines run every iteration).
- early_exaggeration -> ``early_exaggeration``, early_exaggeration_iter -> ``exaggeration_iter``,
  ``late_exaggeration=1``.
- momentum: ``pre_momentum=0.5`` (exaggeration phase), ``post_momentum=0.8``.
- learning_rate: cuML's gradient, like openTSNE's, leaves out the factor 4 and its P sums to
  1, so the shared rate eta (N/12 for "auto") is passed unchanged as ``learning_rate``, which
  cuML uses during early exaggeration. After it, with the adaptive mode off, cuML uses
  ``post_learning_rate = 2 * learning_rate``. Where the estimator exposes
  ``post_learning_rate`` as an attribute (older releases) it is reset to eta; otherwise the
  doubled rate stays and is logged and recorded in ``params["post_learning_rate"]``.
- init "pca"/"random" -> ``init`` (cuML computes its own start; it takes no array, so its
  start differs from the shared one); seed -> ``random_state`` (cuML's FFT t-SNE is not
  bit-reproducible even so); n_jobs has no meaning on the GPU.
- A precomputed graph goes in as ``(indices, distances)`` (int64 indices, float32 Euclidean
  distances): as ``precomputed_knn`` where the constructor has it, else ``knn_graph`` at fit.
  Since cuML 26.08 (rapidsai/cuml PR #8272, documented under ``precomputed_knn``) such a graph
  must hold each point itself in column 0 (distance 0), as cuML's own search returns it, or
  cuML raises ``ValueError``; :func:`graph_layout` builds that layout (self, then the k
  neighbours, ``n_neighbors = k + 1``) for 26.08 and later and the self-free one before.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings

import numpy as np

from advlens._optional import has, require
from advlens.embed import _common
from advlens.embed.base import Embedding, KnnGraph, TSNEParams

NAME = "cuml"
log = logging.getLogger(__name__)


def available() -> bool:
    if not has("cuml"):
        return False
    try:
        cupy = require("cupy", "the cuml t-SNE engine")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver or no device: cuML cannot run
        return False


SELF_COLUMN_SINCE = (26, 8)  # cuML release from which a precomputed graph starts with self


def _version(mod) -> tuple[int, int]:
    """(major, minor) of a RAPIDS version string such as "26.08.00" (0, 0 when unreadable)."""
    try:
        major, minor = str(getattr(mod, "__version__", "0.0")).split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return 0, 0


def _parameters(cls) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # Cython classes may hide their signature
        return set()


def graph_layout(
    idx: np.ndarray, dist: np.ndarray, *, self_first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(indices, distances)`` pair cuML expects from a self-free kNN graph (n, k).

    ``self_first`` (cuML >= 26.08): column 0 holds each point itself at distance 0, then its
    k neighbours, (n, k + 1). Otherwise the graph goes in unchanged, (n, k).
    """
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    dist = np.ascontiguousarray(dist, dtype=np.float32)
    if not self_first:
        return idx, dist
    n = idx.shape[0]
    own = np.arange(n, dtype=np.int64)[:, None]
    return (
        np.ascontiguousarray(np.hstack((own, idx))),
        np.ascontiguousarray(np.hstack((np.zeros((n, 1), np.float32), dist))),
    )


def _construct(cls, kwargs: dict, n_iter: int):
    """``max_iter`` when the class takes it (cuML >= 25.x, where ``n_iter`` only warns),
    ``n_iter`` in older releases; unreadable signatures try ``max_iter`` first."""
    names = _parameters(cls)
    first, second = (
        ("n_iter", "max_iter")
        if "n_iter" in names and "max_iter" not in names
        else ("max_iter", "n_iter")
    )
    with warnings.catch_warnings():
        # cuML 22.04-24.x announce their default method on every construction; we set it.
        warnings.filterwarnings("ignore", message="Starting from version 22.04")
        try:
            return cls(**kwargs, **{first: n_iter})
        except TypeError:
            return cls(**kwargs, **{second: n_iter})


def embed(x: np.ndarray, params: TSNEParams, *, knn: KnnGraph | None = None) -> Embedding:
    manifold = require("cuml.manifold", "the cuml t-SNE engine (cuml-cu12 or cuml-cu13)")
    t0 = time.perf_counter()
    n = x.shape[0]
    k = _common.k_neighbors(params.perplexity, n)
    eta = _common.learning_rate(params, n)
    kwargs = dict(
        n_components=2,
        perplexity=params.perplexity,
        early_exaggeration=params.early_exaggeration,
        late_exaggeration=1.0,
        learning_rate=eta,
        min_grad_norm=0.0,
        init=params.init,
        random_state=params.seed,
        method="fft",
        n_neighbors=k,
        exaggeration_iter=params.early_exaggeration_iter,
        pre_momentum=0.5,
        post_momentum=0.8,
        learning_rate_method=None,
        square_distances=True,
        output_type="numpy",
    )
    cuml = require("cuml", "the cuml t-SNE engine (cuml-cu12 or cuml-cu13)")
    # From 26.08 a point is its own first neighbour, so k real neighbours are k + 1 columns,
    # for cuML's own search as for a precomputed graph.
    self_first = _version(cuml) >= SELF_COLUMN_SINCE
    kwargs["n_neighbors"] = min(n, k + 1) if self_first else k
    graph = None
    if knn is not None:
        graph = graph_layout(*_common.check_knn(knn, n, k, NAME), self_first=self_first)
        if "precomputed_knn" in _parameters(manifold.TSNE) or self_first:
            kwargs["precomputed_knn"] = graph
    model = _construct(manifold.TSNE, kwargs, params.n_iter)
    if hasattr(model, "post_learning_rate"):
        model.post_learning_rate = eta  # older cuML reads it at fit time
        post = eta
    else:
        post = 2.0 * eta
        log.info(
            "cuml: after early exaggeration cuML uses 2 x learning_rate = %.4g "
            "(the other engines keep %.4g)",
            post,
            eta,
        )
    fit_kwargs = {}
    if graph is not None and "precomputed_knn" not in kwargs:
        fit_kwargs["knn_graph"] = graph  # cuML before precomputed_knn
    xy = model.fit_transform(np.ascontiguousarray(x, dtype=np.float32), **fit_kwargs)
    xy = np.asarray(xy.get() if hasattr(xy, "get") else xy, dtype=np.float32)
    seconds = time.perf_counter() - t0
    return Embedding(
        xy=np.ascontiguousarray(xy),
        seconds=seconds,
        engine=NAME,
        params=params.to_dict()
        | {
            "learning_rate": eta,
            "post_learning_rate": post,
            "n_neighbors": k,
            "cuml_n_neighbors": kwargs["n_neighbors"],
            "knn": "precomputed" if knn is not None else "internal",
        },
        knn_seconds=0.0 if knn is not None else None,
    )
