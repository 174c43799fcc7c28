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
import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from advlens.embed._common import knn_graph, recall_at_k, trustworthiness
from advlens.errors import ConfigError, DataError, closest

log = logging.getLogger(__name__)

# name -> module path; modules are imported lazily (torch, cuml are heavy or absent).
ENGINES: dict[str, str] = {
    "sklearn": "advlens.embed.sklearn",
    "opentsne": "advlens.embed.opentsne",
    "cuml": "advlens.embed.cuml",
    "torch": "advlens.embed.torch_tsne",
}
AUTO = "auto"
INITS = ("pca", "random")

__all__ = [
    "ENGINES",
    "Embedding",
    "Engine",
    "TSNEParams",
    "available_engines",
    "embed",
    "get_engine",
    "knn_graph",
    "list_engines",
    "recall_at_k",
    "resolve_engine",
    "trustworthiness",
]


@dataclass(frozen=True)
class TSNEParams:
    """t-SNE settings with one meaning in every engine.

    perplexity: Gaussian perplexity; neighbours used = 3 * perplexity.
    n_iter: total iterations, early exaggeration included.
    early_exaggeration, early_exaggeration_iter: factor and length of the first phase
        (momentum 0.5 there, 0.8 afterwards, in every engine).
    learning_rate: in openTSNE's units; ``"auto"`` = N / early_exaggeration (N/12), kept for
        both phases.
    init: ``"pca"`` (PCA scaled to std 1e-4, as openTSNE) or ``"random"``.
    seed: random seed; n_jobs: CPU threads (-1: all).
    """

    perplexity: float = 30.0
    n_iter: int = 1000
    early_exaggeration: float = 12.0
    early_exaggeration_iter: int = 250
    learning_rate: float | str = "auto"
    init: str = "pca"
    seed: int = 0
    n_jobs: int = -1

    def __post_init__(self) -> None:
        if not self.perplexity > 0:
            raise ConfigError(f"embed.perplexity = {self.perplexity}: must be > 0")
        if self.n_iter < 1:
            raise ConfigError(f"embed.n_iter = {self.n_iter}: must be at least 1")
        if not 0 <= self.early_exaggeration_iter <= self.n_iter:
            raise ConfigError(
                f"embed.early_exaggeration_iter = {self.early_exaggeration_iter}: must lie in "
                f"[0, n_iter = {self.n_iter}] (n_iter counts all iterations)"
            )
        if not self.early_exaggeration >= 1:
            raise ConfigError(f"embed.early_exaggeration = {self.early_exaggeration}: must be >= 1")
        lr = self.learning_rate
        if isinstance(lr, str):
            if lr != "auto":
                raise ConfigError(f"embed.learning_rate = {lr!r}: use a number > 0 or 'auto'")
        elif not (isinstance(lr, int | float) and np.isfinite(lr) and lr > 0):
            raise ConfigError(f"embed.learning_rate = {lr!r}: use a number > 0 or 'auto'")
        if self.init not in INITS:
            raise ConfigError(f"embed.init = {self.init!r}: valid values are {', '.join(INITS)}")
        if self.n_jobs == 0:
            raise ConfigError("embed.n_jobs = 0: use a positive count or -1 for all cores")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, cfg, **overrides: Any) -> TSNEParams:
        """Parameters from an :class:`advlens.config.EmbedConfig` (first seed and perplexity).

        Reads the config's task-shaping settings (see :func:`advlens.config.shaping`), so a
        t-SNE setting that would not change the task id cannot reach an engine.
        """
        from advlens.config import shaping

        base = shaping(cfg, "task", spread=True)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(base)
        if missing:  # a programming error: the config must declare these as shaping a task
            raise TypeError(f"{type(cfg).__name__} lacks task settings {sorted(missing)}")
        return cls(**({k: v for k, v in base.items() if k in names} | overrides))


@dataclass(frozen=True)
class Embedding:
    """A 2-D map: ``xy`` (n, 2) float32, wall ``seconds`` of the engine call (kNN included),
    ``knn_seconds`` of those spent on the neighbour search (0.0 when a graph was handed in,
    None when the engine does not separate it) and the effective ``params``."""

    xy: np.ndarray
    seconds: float
    engine: str
    params: dict[str, Any] = field(default_factory=dict)
    knn_seconds: float | None = None

    def __post_init__(self) -> None:
        xy = self.xy
        if not isinstance(xy, np.ndarray) or xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(
                f"Embedding from {self.engine!r}: xy must be an (n, 2) array, got "
                f"{getattr(xy, 'shape', type(xy))}"
            )
        if xy.dtype != np.float32:
            raise ValueError(f"Embedding from {self.engine!r}: xy must be float32, not {xy.dtype}")
        if not np.isfinite(xy).all():
            raise ValueError(f"Embedding from {self.engine!r}: xy has NaN or infinite values")
        if not self.seconds >= 0:
            raise ValueError(f"Embedding from {self.engine!r}: seconds = {self.seconds}")


class Engine(Protocol):
    """What an engine module provides."""

    NAME: str

    def available(self) -> bool: ...

    def embed(self, x: np.ndarray, params: TSNEParams, *, knn=None) -> Embedding: ...


def list_engines() -> list[str]:
    """Every registry name, ``auto`` included."""
    return [*ENGINES, AUTO]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(ENGINES[name])
    except ModuleNotFoundError as exc:
        if exc.name == ENGINES[name]:  # the engine module itself is not part of this build
            return None
        raise


def available_engines() -> list[str]:
    """Concrete engines whose libraries (and, for GPU engines, a GPU) are present."""
    out = []
    for name in ENGINES:
        mod = _import(name)
        if mod is not None and mod.available():
            out.append(name)
    return out


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_engine(name: str) -> str:
    """Registry name -> concrete engine name (``auto``: torch on a CUDA GPU, else opentsne)."""
    if name == AUTO:
        if _has_cuda():
            mod = _import("torch")
            if mod is not None and mod.available():
                return "torch"
        return "opentsne"
    if name not in ENGINES:
        raise ConfigError(f"unknown t-SNE engine {name!r}; {closest(name, list_engines())}")
    return name


def get_engine(name: str) -> Engine:
    """The engine module for ``name`` (``auto`` resolved), imported now."""
    concrete = resolve_engine(name)
    mod = _import(concrete)
    if mod is None:
        raise ConfigError(
            f"t-SNE engine {concrete!r} ({ENGINES[concrete]}) is not part of this advlens "
            f"installation; available: {', '.join(available_engines())}"
        )
    return mod  # type: ignore[return-value]


def _check_input(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"embed: x must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[0] < 4:
        raise DataError(f"embed: t-SNE needs at least 4 points, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DataError("embed: x contains NaN or infinite values; check the activations")
    return np.ascontiguousarray(x, dtype=np.float32)


def max_perplexity(n_points: int) -> float:
    """The largest perplexity ``n_points`` allow (3 x perplexity neighbours, openTSNE's rule);
    :func:`embed` lowers a larger one to this in every engine alike."""
    return (n_points - 1) / 3.0


def embed(
    x: np.ndarray,
    *,
    engine: str = AUTO,
    params: TSNEParams | None = None,
    knn: tuple[np.ndarray, np.ndarray] | None = None,
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
