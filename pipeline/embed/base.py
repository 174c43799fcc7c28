"""The t-SNE engine family's interface: :class:`TSNEParams` (one meaning in every engine),
:class:`Embedding` (what every engine returns) and the :class:`Engine` protocol.

Implementations, one module each (``sklearn``, ``opentsne``, ``cuml``, ``torch_tsne``), are
modules that meet :class:`Engine`: ``NAME``, ``available()`` and ``embed(x, params, *, knn)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from advlens.config import shaping
from advlens.errors import ConfigError

INITS = ("pca", "random")
KnnGraph = tuple[np.ndarray, np.ndarray]  # (idx, dist) from advlens.embed.knn_graph


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
    def from_config(cls, cfg: Any, **overrides: Any) -> TSNEParams:
        """Parameters from an :class:`advlens.config.EmbedConfig` (first seed and perplexity).

        Reads the config's task-shaping settings (see :func:`advlens.config.shaping`), so a
        t-SNE setting that would not change the task id cannot reach an engine.
        """
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


@runtime_checkable
class Engine(Protocol):
    """What an engine module provides (a module meets a protocol through its attributes)."""

    NAME: str

    def available(self) -> bool: ...

    def embed(
        self, x: np.ndarray, params: TSNEParams, *, knn: KnnGraph | None = None
    ) -> Embedding: ...


def max_perplexity(n_points: int) -> float:
    """The largest perplexity ``n_points`` allow (3 x perplexity neighbours, openTSNE's rule);
    :func:`embed` lowers a larger one to this in every engine alike."""
    return (n_points - 1) / 3.0
