"""Run configuration: frozen dataclasses loaded from TOML and overridden from the CLI.

Every stage reads its part (``cfg.data``, ``cfg.attack``, ...). The whole config is stored in
the run's Zarr attributes (:meth:`RunConfig.to_dict`) so that every result says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from advlens.errors import ConfigError, closest

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"

# Default eps per dataset and norm (issue 2): Fashion-MNIST Linf 0.1 / L2 1.5, CIFAR-10 8/255 / 0.5.
DEFAULT_EPS = {
    "fashion-mnist": {"linf": 0.1, "l2": 1.5},
    "cifar10": {"linf": 8 / 255, "l2": 0.5},
}
NORMS = ("linf", "l2", "l1")


@dataclass(frozen=True)
class DataConfig:
    """Which images to attack: ``source`` in fashion-mnist, cifar10, folder, synthetic."""

    source: str = "fashion-mnist"
    path: str | None = None  # folder with the files; None: the source's standard place
    split: str = "test"
    n: int = 1000  # number of attacked (correctly classified) samples
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"data.n = {self.n}: the number of samples must be at least 1")


@dataclass(frozen=True)
class ModelConfig:
    """Which network: a zoo name (small-cnn, wrn-28-10, denser) or ``module:factory``."""

    name: str = "small-cnn"
    checkpoint: str | None = None  # None for small-cnn: trained and cached by `advlens train`
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    train_epochs: int = 4
    train_seed: int = 0
    mean: str | None = None  # denser: per-pixel training mean (.npy, (H, W, C)); "none" disables


@dataclass(frozen=True)
class AttackConfig:
    """Which attack(s) and budget. ``eps`` maps norm -> radius; empty: the dataset default."""

    name: str = "apgd-ce"
    names: tuple[str, ...] = ()  # several attacks in one run; empty: (name,)
    norms: tuple[str, ...] = ("l2", "linf")
    eps: dict[str, float] = field(default_factory=dict)
    n_iter: int = 100
    n_restarts: int = 1
    rho: float = 0.75
    seed: int = 0
    batch_size: int = 250
    autocast_bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for norm in self.norms:
            if norm not in NORMS:
                raise ConfigError(
                    f"attack.norms contains {norm!r}: valid norms are {', '.join(NORMS)}"
                )
        for norm, eps in self.eps.items():
            if norm not in NORMS:
                raise ConfigError(
                    f"attack.eps has key {norm!r}: valid norms are {', '.join(NORMS)}"
                )
            if not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
                raise ConfigError(f"attack.eps.{norm} = {eps!r}: eps must be a finite number >= 0")
        if self.n_iter < 1:
            raise ConfigError(f"attack.n_iter = {self.n_iter}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"attack.batch_size = {self.batch_size}: must be at least 1")

    @property
    def attack_names(self) -> tuple[str, ...]:
        return self.names or (self.name,)

    def eps_for(self, norm: str, dataset: str) -> float:
        """The radius for ``norm``: the configured one, else the dataset's default."""
        if norm in self.eps:
            return float(self.eps[norm])
        defaults = DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])
        if norm not in defaults:
            raise ConfigError(f"no default eps for norm {norm!r}: set attack.eps.{norm}")
        return defaults[norm]


@dataclass(frozen=True)
class LayersConfig:
    """Which layers to tap: names, globs, ``auto`` or ``all``; plus the input itself."""

    select: tuple[str, ...] = ("all",)
    include_input: bool = True
    pool: str = "none"  # none or gap (global average pooling of conv feature maps)


@dataclass(frozen=True)
class EmbedConfig:
    """Dimensionality reduction and t-SNE settings, shared by every engine."""

    engine: str = "auto"  # advlens' torch engine on a CUDA GPU, openTSNE otherwise
    engines: tuple[str, ...] = ()  # several engines; empty: (engine,)
    pca_dims: int = 50
    perplexity: float = 30.0
    perplexities: tuple[float, ...] = ()  # repeats over perplexity; empty: (perplexity,)
    n_iter: int = 1000
    early_exaggeration: float = 12.0
    early_exaggeration_iter: int = 250
    learning_rate: float | str = "auto"
    init: str = "pca"
    seed: int = 0
    seeds: tuple[int, ...] = ()  # repeats over seed; empty: (seed,)
    n_jobs: int = -1

    def __post_init__(self) -> None:
        if self.perplexity <= 0:
            raise ConfigError(f"embed.perplexity = {self.perplexity}: must be > 0")
        if self.pca_dims < 2:
            raise ConfigError(f"embed.pca_dims = {self.pca_dims}: must be at least 2")

    @property
    def engine_names(self) -> tuple[str, ...]:
        return self.engines or (self.engine,)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    @property
    def perplexity_list(self) -> tuple[float, ...]:
        return self.perplexities or (self.perplexity,)


@dataclass(frozen=True)
class OverlapConfig:
    """The overlap metric (see docs/design.md): variant and k, plus a k-sweep."""

    k: int = 10
    variant: str = "overlap"
    k_sweep: tuple[int, ...] = (5, 10, 20, 50)
    bootstrap: int = 200

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"overlap.k = {self.k}: must be at least 1")
        if self.variant not in ("overlap", "mixing", "pair"):
            raise ConfigError(
                f"overlap.variant = {self.variant!r}: valid variants are overlap, mixing, pair"
            )


@dataclass(frozen=True)
class OutputConfig:
    """Where results go: ``<root>/<name>/``."""

    root: str = "runs"
    name: str = "default"
    dtype: str = "float16"  # store dtype: float16 or float32
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"output.dtype = {self.dtype!r}: use float16 or float32")

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass(frozen=True)
class ScheduleConfig:
    """How layer tasks run: in process, on local Dask workers, or on a cluster."""

    workers: int = (
        0  # 0: automatic (in process on a CPU or one GPU, one worker per GPU when several)
    )
    scheduler: str | None = None  # address of an existing scheduler, tcp://host:8786
    gpus: tuple[int, ...] = ()  # GPUs to use; empty: all visible
    retries: int = 1


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts, naming any unknown key and its source."""
    return _build(RunConfig, data, prefix="", source=source)


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown config key {prefix + key!r}; "
                f"{closest(key, known)} (in [{prefix.rstrip('.') or 'top level'}])"
            )
        kwargs[key] = _coerce(hints[key], value, prefix + key, source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}]: {exc}") from None


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(args[0], v, key, source) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: {key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{source}: {key} = {value!r}: expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{source}: {key} = {value!r}: expected an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a number") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a string")
        return str(value)
    return value


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML config (default: ``configs/default.toml``) and apply ``key=value`` overrides."""
    if path is None and not DEFAULT_CONFIG.is_file():
        # Installed without the repository's configs/: the dataclass defaults are the same run.
        return apply_overrides(RunConfig(), overrides or [])
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config PATH")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings; values are parsed as TOML where possible."""
    if not overrides:
        return cfg
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. data.n=500")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word such as engine=sklearn
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"--set {item!r}: unknown config key {key!r}; {closest(part, node)}"
                )
            node = node[part]
        if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "eps"):
            raise ConfigError(
                f"--set {item!r}: unknown config key {key!r}; {closest(parts[-1], node)}"
            )
        node[parts[-1]] = value
    return from_dict(data, source="--set")
