"""RAPIDS cuML engine: ``cuml.manifold.TSNE`` with the FFT method, on a CUDA GPU.

Install with ``pip install cuml-cu12`` from NVIDIA's package index (or
``cuml-cu13``). Mapping of :class:`advlens.embed.TSNEParams` (cuML's documented API):

- ``learning_rate_method=None``: cuML's default "adaptive" mode replaces the learning rate,
  the early exaggeration (24 above 10,000 points) and the neighbour count by its own
  size-based choices, so it is switched off for a fair comparison.
- perplexity -> ``perplexity``; ``n_neighbors`` set explicitly to min(n - 1, 3 * perplexity)
  (cuML's default of 90 only matches perplexity 30), ``square_distances=True`` (Euclidean
  distances squared, as every engine here does), ``perplexity_max_iter`` left at 100.
- n_iter (total) -> ``max_iter`` (``n_iter`` in cuML releases before 25.x);
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
- A precomputed graph goes in as ``knn_graph=(indices, distances)`` (first n_neighbors columns,
  Euclidean distances, int64 indices).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings

import numpy as np

from advlens.embed import _common

NAME = "cuml"
log = logging.getLogger(__name__)


def available() -> bool:
    from advlens._optional import has

    if not has("cuml"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver or no device: cuML cannot run
        return False


def _construct(cls, kwargs: dict, n_iter: int):
    """``max_iter`` in recent cuML, ``n_iter`` before; Cython classes may hide signatures."""
    try:
        names = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        names = {}
    first, second = ("n_iter", "max_iter") if "n_iter" in names else ("max_iter", "n_iter")
    with warnings.catch_warnings():
        # cuML 22.04-24.x announce their default method on every construction; we set it.
        warnings.filterwarnings("ignore", message="Starting from version 22.04")
        try:
            return cls(**kwargs, **{first: n_iter})
        except TypeError:
            return cls(**kwargs, **{second: n_iter})


def embed(x: np.ndarray, params, *, knn=None):
    from advlens._optional import require
    from advlens.embed import Embedding

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
    if knn is not None:
        idx, dist = _common.check_knn(knn, n, k, NAME)
        fit_kwargs["knn_graph"] = (idx.astype(np.int64), dist.astype(np.float32))
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
            "knn": "precomputed" if knn is not None else "internal",
        },
        knn_seconds=0.0 if knn is not None else None,
    )
