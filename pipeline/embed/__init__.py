"""Joint t-SNE of clean and perturbed points through interchangeable engines.

Engines (one module each, imported only when used): ``sklearn`` (scikit-learn), ``opentsne``
(openTSNE), ``cuml`` (RAPIDS cuML, GPU), ``torch`` (advlens' own GPU engine) and ``auto``
(``torch`` when a CUDA GPU is present and that engine is available, else ``opentsne``).
Every engine reads the same :class:`TSNEParams`; each module's docstring maps them to its
library's arguments. Example::

    from advlens.embed import embed, knn_graph
    emb = embed(x, engine="opentsne", perplexity=30, seed=0)
    graph = knn_graph(x, perplexity=30)          # once, then for every engine:
    emb2 = embed(x, engine="sklearn", knn=graph)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from advlens._env import has_cuda
from advlens._optional import MissingDependency
from advlens.embed._common import knn_graph, recall_at_k, trustworthiness
from advlens.embed.base import INITS, Embedding, Engine, KnnGraph, TSNEParams, max_perplexity
from advlens.errors import ConfigError, DataError, closest
from advlens.registry import Registry

log = logging.getLogger(__name__)

# name -> engine module, imported on first use (torch, cuML are heavy or absent)
ENGINES: Registry[Engine] = Registry("t-SNE engine", setting="embed.engine")
ENGINES.register("sklearn", "advlens.embed.sklearn")
ENGINES.register("opentsne", "advlens.embed.opentsne")
ENGINES.register("cuml", "advlens.embed.cuml")
ENGINES.register("torch", "advlens.embed.torch_tsne")
AUTO = "auto"

__all__ = [
    "ENGINES",
    "INITS",
    "Embedding",
    "Engine",
    "KnnGraph",
    "TSNEParams",
    "available_engines",
    "embed",
    "get_engine",
    "knn_graph",
    "list_engines",
    "max_perplexity",
    "recall_at_k",
    "resolve_engine",
    "trustworthiness",
]


def list_engines() -> list[str]:
    """Every registry name, ``auto`` included."""
    return [*ENGINES.names(), AUTO]


def _import(name: str) -> Engine | None:
    try:
        return ENGINES.get(name)
    except MissingDependency:  # the engine module (or what it needs at import) is missing
        return None


def available_engines() -> list[str]:
    """Concrete engines whose libraries (and, for GPU engines, a GPU) are present."""
    out = []
    for name in ENGINES.names():
        mod = _import(name)
        if mod is not None and mod.available():
            out.append(name)
    return out


def resolve_engine(name: str) -> str:
    """Registry name -> concrete engine name (``auto``: torch on a CUDA GPU, else opentsne)."""
    if name == AUTO:
        if has_cuda():
            mod = _import("torch")
            if mod is not None and mod.available():
                return "torch"
        return "opentsne"
    if name not in ENGINES:
        raise ENGINES.unknown(name, list_engines())
    return name


def get_engine(name: str) -> Engine:
    """The engine module for ``name`` (``auto`` resolved), imported now."""
    return ENGINES.get(resolve_engine(name))


def _check_input(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"embed: x must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[0] < 4:
        raise DataError(f"embed: t-SNE needs at least 4 points, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DataError("embed: x contains NaN or infinite values; check the activations")
    return np.ascontiguousarray(x, dtype=np.float32)


def embed(
    x: np.ndarray,
    *,
    engine: str = AUTO,
    params: TSNEParams | None = None,
    knn: KnnGraph | None = None,
    **overrides: Any,
) -> Embedding:
    """Embed the rows of ``x`` (n, d) in 2-D with ``engine``.

    Parameters
    ----------
    params : shared settings (default :class:`TSNEParams`); ``overrides`` replace fields,
        e.g. ``embed(x, perplexity=50, seed=1)``.
    knn : optional precomputed ``(idx, dist)`` graph from :func:`knn_graph`, reused by the
        engines that accept one.
    """
    params = params or TSNEParams()
    names = {f.name for f in dataclasses.fields(TSNEParams)}
    for key in overrides:
        if key not in names:
            raise ConfigError(f"embed: unknown t-SNE setting {key!r}; {closest(key, names)}")
    if overrides:
        params = dataclasses.replace(params, **overrides)
    x = _check_input(x)
    n = x.shape[0]
    limit = max_perplexity(n)
    if params.perplexity > limit:
        # Too few points for 3 * perplexity neighbours: lower it the way openTSNE does, here
        # once for every engine so that they still agree.
        log.info("perplexity %g too large for %d points; using %.3g", params.perplexity, n, limit)
        params = dataclasses.replace(params, perplexity=limit)
    mod = get_engine(engine)
    return mod.embed(x, params, knn=knn)
