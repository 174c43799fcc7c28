"""Run configuration: frozen dataclasses loaded from TOML and overridden from the CLI.

Every stage reads its part (``cfg.data``, ``cfg.attack``, ...). The whole config is stored in
the run's Zarr attributes (:meth:`RunConfig.to_dict`) so that every result says how it was made.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from advlens._io import jsonable
from advlens.errors import ConfigError, closest

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"

# Default eps per dataset and norm (issue 2): Fashion-MNIST Linf 0.1 / L2 1.5, CIFAR-10 8/255 / 0.5.
DEFAULT_EPS = {
    "fashion-mnist": {"linf": 0.1, "l2": 1.5},
    "cifar10": {"linf": 8 / 255, "l2": 0.5},
}
NORMS = ("linf", "l2", "l1")
STORE_DTYPES = ("float16", "float32")  # the dtypes an activation store holds (output.dtype)

# What a setting shapes (docs/design.md, "Settings and identity"): "store" changes the stored
# activations (a store written with another value is refused), "task" changes one layer task's
# row (its task id), "none" changes neither (where and how the work runs). ``spread`` marks the
# lists a run spreads over several stores or tasks (attack names and norms, engines, seeds,
# perplexities): each store or task records its own value instead.
SHAPES = ("store", "task", "none")


def setting(shapes: str, default: Any = dataclasses.MISSING, *, factory: Any = None,
            spread: bool = False, doc: str = "") -> Any:  # fmt: skip
    """A config field that declares what it shapes (one of :data:`SHAPES`) and what it means
    (``doc``, one line: ``advlens config`` prints it)."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
    meta = {"shapes": shapes, "spread": spread, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def shaping(section: Any, shapes: str, *, spread: bool = False) -> dict[str, Any]:
    """``section``'s settings that shape ``shapes``; the spread lists only with ``spread``."""
    return {
        f.name: jsonable(getattr(section, f.name))
        for f in fields(section)
        if f.metadata["shapes"] == shapes and (spread or not f.metadata["spread"])
    }


def shaping_keys(cfg: RunConfig, shapes: str) -> list[str]:
    """Dotted names of every setting of ``cfg`` that shapes ``shapes`` (for provenance)."""
    return [
        f"{sec.name}.{f.name}"
        for sec in fields(cfg)
        for f in fields(getattr(cfg, sec.name))
        if f.metadata["shapes"] == shapes
    ]


@dataclass(frozen=True)
class DataConfig:
    """Which images to attack: ``source`` in fashion-mnist, cifar10, folder, synthetic."""

    source: str = setting(
        "store", "fashion-mnist", doc="fashion-mnist, cifar10, folder or synthetic"
    )
    path: str | None = setting(
        "store", None, doc="folder with the files; none: the source's standard place"
    )
    split: str = setting("store", "test", doc="train or test")
    n: int = setting("store", 1000, doc="number of attacked (correctly classified) samples")
    seed: int = setting("store", 0, doc="seed of the class-stratified sample")

    def __post_init__(self) -> None:
        if self.n < 3:  # t-SNE, the kNN score and the held-out detector need a few points
            raise ConfigError(f"data.n = {self.n}: the number of samples must be at least 3")


ADVERSARIAL = ("pgd-linf",)


@dataclass(frozen=True)
class AdvRecipe:
    """Adversarial training (Madry et al.): PGD under ``method``'s norm with budget ``eps`` and
    ``steps`` steps of ``2.5 * eps / steps`` from a uniform random start."""

    method: str = "pgd-linf"
    eps: float = 0.1
    steps: int = 7

    def __post_init__(self) -> None:
        if self.method not in ADVERSARIAL:
            raise ConfigError(
                f"adversarial = {self.method!r}: valid methods are {', '.join(ADVERSARIAL)}"
            )
        if not 0 < self.eps < 1 or self.steps < 1:
            raise ConfigError(
                f"adversarial training eps = {self.eps}, steps = {self.steps}: use 0 < eps < 1 "
                "(images lie in [0, 1]) and steps >= 1"
            )

    @property
    def tag(self) -> str:
        return f"{self.method}-e{self.eps:g}-k{self.steps}"


@dataclass(frozen=True)
class ModelConfig:
    """Which network: a zoo name (small-cnn, wrn-28-10, denser) or ``module:factory``."""

    name: str = setting(
        "store", "small-cnn", doc="zoo name or package.module:factory (cwd is importable)"
    )
    checkpoint: str | None = setting(
        "store", None, doc="weights file; none for small-cnn: trained and cached by `advlens train`"
    )
    device: str = setting("store", "auto", doc="auto, cpu, cuda, cuda:1, ...")
    train_epochs: int = setting("store", 4, doc="small-cnn: epochs of `advlens train`")
    train_seed: int = setting(
        "store", 0, doc="small-cnn: training seed (part of the cached weights' name)"
    )
    mean: str | None = setting(
        "store", None, doc='denser: per-pixel training mean (.npy, (H, W, C)); "none" disables'
    )
    lambda_map: dict[str, str] = setting(
        "store",
        factory=dict,
        doc="denser: Lambda layer name -> known operation, for Lambdas advlens cannot recognise",
    )
    adversarial: str | None = setting(
        "store", None, doc='small-cnn: "pgd-linf" trains it adversarially (Madry)'
    )
    adversarial_eps: float = setting("store", 0.1, doc="adversarial training: Linf radius")
    adversarial_steps: int = setting("store", 7, doc="adversarial training: PGD steps")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"model.device = {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.train_epochs < 1:
            raise ConfigError(f"model.train_epochs = {self.train_epochs}: must be at least 1")
        if self.adversarial in ("none", ""):  # --set model.adversarial=none: the standard model
            object.__setattr__(self, "adversarial", None)
        if self.adversarial is not None:  # checked here, before any data or model is touched
            AdvRecipe(self.adversarial, self.adversarial_eps, self.adversarial_steps)


@dataclass(frozen=True)
class AttackConfig:
    """Which attack(s) and budget. ``eps`` maps norm -> radius; empty: the dataset default."""

    name: str = setting(
        "store", "apgd-ce", spread=True, doc="apgd-ce, apgd-dlr, apgd-t or foolbox:<Class>"
    )
    names: tuple[str, ...] = setting(
        "store", (), spread=True, doc="several attacks in one run; empty: (name,)"
    )
    norms: tuple[str, ...] = setting(
        "store", ("l2", "linf"), spread=True, doc="threat models: linf, l2, l1 (any case)"
    )
    eps: dict[str, float] = setting(
        "store",
        factory=dict,
        spread=True,
        doc='norm -> radius ("8/255" ok); 0: unperturbed baseline',
    )
    n_iter: int = setting("store", 100, doc="attack iterations (foolbox: steps)")
    n_restarts: int = setting("store", 1, doc="APGD random restarts")
    rho: float = setting("store", 0.75, doc="APGD step-size halving threshold")
    seed: int = setting("store", 0, doc="attack seed (per batch: seed * 1000003 + batch)")
    batch_size: int = setting(
        "store", 250, doc="images per attack batch (also the store's chunk rows)"
    )
    autocast_bf16: bool = setting(
        "store", False, doc="GPU: bf16 autocast of the attack's forward passes"
    )
    channels_last: bool = setting(
        "store", False, doc="GPU: channels-last memory format for inputs and model"
    )
    memory_mb: int = setting(
        "none",
        2048,
        doc="extraction working memory (MiB): attack and taps run in sub-batches that fit; "
        "0: whole batches",
    )

    def __post_init__(self) -> None:
        if not self.norms:
            raise ConfigError(f"attack.norms is empty: name at least one of {', '.join(NORMS)}")
        if not all(self.attack_names):
            raise ConfigError(f"attack.names = {list(self.names)}: names must not be empty")
        for norm in self.norms:
            if str(norm).lower() not in NORMS:
                raise ConfigError(
                    f"attack.norms contains {norm!r}: valid norms are {', '.join(NORMS)}"
                )
        for norm, eps in self.eps.items():
            if str(norm).lower() not in NORMS:
                raise ConfigError(
                    f"attack.eps has key {norm!r}: valid norms are {', '.join(NORMS)}"
                )
            if not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
                raise ConfigError(f"attack.eps.{norm} = {eps!r}: eps must be a finite number >= 0")
        # Norm names are case-insensitive (Linf, L2); frozen, so set through object.
        object.__setattr__(self, "norms", tuple(str(n).lower() for n in self.norms))
        object.__setattr__(self, "eps", {str(k).lower(): v for k, v in self.eps.items()})
        if self.n_iter < 1:
            raise ConfigError(f"attack.n_iter = {self.n_iter}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"attack.batch_size = {self.batch_size}: must be at least 1")
        if (
            isinstance(self.memory_mb, bool)
            or not isinstance(self.memory_mb, int)
            or self.memory_mb < 0
        ):
            raise ConfigError(
                f"attack.memory_mb = {self.memory_mb!r}: give the extraction memory budget in MiB "
                "(an integer, e.g. 2048), or 0 for whole batches"
            )
        if self.n_restarts < 1:
            raise ConfigError(f"attack.n_restarts = {self.n_restarts}: must be at least 1")
        if not 0 < self.rho < 1:
            raise ConfigError(f"attack.rho = {self.rho}: must lie strictly between 0 and 1")
        if self.seed < 0:
            raise ConfigError(f"attack.seed = {self.seed}: must be >= 0")

    @property
    def attack_names(self) -> tuple[str, ...]:
        return self.names or (self.name,)

    def eps_for(self, norm: str, dataset: str) -> float:
        """The radius for ``norm``: the configured one, else the dataset's default."""
        norm = norm.lower()
        if norm in self.eps:
            return float(self.eps[norm])
        defaults = DEFAULT_EPS.get(dataset, DEFAULT_EPS["cifar10"])
        if norm not in defaults:
            raise ConfigError(f"no default eps for norm {norm!r}: set attack.eps.{norm}")
        return defaults[norm]


@dataclass(frozen=True)
class LayersConfig:
    """Which layers to tap: names, globs, ``auto`` or ``all``; plus the input itself."""

    select: tuple[str, ...] = setting(
        "store", ("all",), doc="layer names or globs, auto (main stages) or all"
    )
    include_input: bool = setting(
        "store", True, doc="also analyse the input pixels as layer 'input'"
    )
    pool: str = setting(
        "store", "none", doc="none or gap (global average pooling of conv feature maps)"
    )

    def __post_init__(self) -> None:
        if not self.select:
            raise ConfigError("layers.select is empty: name layers, globs, 'auto' or 'all'")
        if self.pool not in ("none", "gap"):
            raise ConfigError(f"layers.pool = {self.pool!r}: valid values are none, gap")


@dataclass(frozen=True)
class EmbedConfig:
    """Dimensionality reduction and t-SNE settings, shared by every engine."""

    engine: str = setting(
        "task",
        "auto",
        spread=True,
        doc="t-SNE engine: auto (torch on a CUDA GPU, else opentsne), opentsne, sklearn, cuml or torch",
    )
    engines: tuple[str, ...] = setting(
        "task", (), spread=True, doc="several engines; empty: (engine,)"
    )
    pca_dims: int = setting("task", 50, doc="PCA dimensions before t-SNE")
    perplexity: float = setting("task", 30.0, spread=True, doc="t-SNE perplexity")
    perplexities: tuple[float, ...] = setting(
        "task", (), spread=True, doc="repeats over perplexity; empty: (perplexity,)"
    )
    n_iter: int = setting("task", 1000, doc="t-SNE iterations, early exaggeration included")
    early_exaggeration: float = setting("task", 12.0, doc="t-SNE early exaggeration factor")
    early_exaggeration_iter: int = setting("task", 250, doc="iterations with early exaggeration")
    learning_rate: float | str = setting(
        "task", "auto", doc="auto: N / 12 (N = clean + perturbed points)"
    )
    init: str = setting("task", "pca", doc="pca or random initialisation of the map")
    seed: int = setting("task", 0, spread=True, doc="seed of PCA and t-SNE")
    seeds: tuple[int, ...] = setting(
        "task", (), spread=True, doc="repeats over seed; empty: (seed,)"
    )
    n_jobs: int = setting("task", -1, doc="CPU threads (-1: all, resolved once per run)")
    memory_budget: int | str = setting(
        "none",
        "auto",
        doc="memory for the PCA's row blocks: bytes or e.g. 256MB; auto: 1/4 of the available "
        "memory, at most 512 MiB (the result does not depend on it)",
    )

    def __post_init__(self) -> None:
        memory_bytes(self.memory_budget)  # checked at load, resolved in the task
        if not (math.isfinite(self.perplexity) and self.perplexity > 0):
            raise ConfigError(f"embed.perplexity = {self.perplexity}: must be a finite number > 0")
        for perp in self.perplexities:
            if not (math.isfinite(perp) and perp > 0):
                raise ConfigError(f"embed.perplexities contains {perp}: must be finite and > 0")
        if self.n_jobs == 0 or self.n_jobs < -1:
            raise ConfigError(f"embed.n_jobs = {self.n_jobs}: use a count >= 1, or -1 for all")
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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}  # fmt: skip
AUTO_BUDGET_FRACTION = 4  # auto: 1 / 4 of the available memory ...
AUTO_BUDGET_MAX = 512 * 2**20  # ... at most 512 MiB: larger blocks do not make the PCA faster
MIN_BUDGET = 2**20


def memory_bytes(value: int | str, available: int | None = None) -> int:
    """``embed.memory_budget`` in bytes: an integer, a size such as ``"256MB"`` or ``"1GiB"``,
    or ``"auto"`` (a quarter of the available memory, at most :data:`AUTO_BUDGET_MAX`;
    ``available`` defaults to this machine's)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if available is None:
            available = available_memory()
        return max(MIN_BUDGET, min(AUTO_BUDGET_MAX, available // AUTO_BUDGET_FRACTION))
    got = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(value).lower())
    if isinstance(value, bool) or not isinstance(value, int | str) or got is None:
        raise ConfigError(
            f"embed.memory_budget = {value!r}: give bytes (e.g. 268435456), a size such as "
            '"256MB" or "1GiB", or "auto"'
        )
    size = int(float(got.group(1)) * _UNITS[got.group(2) or ""])
    if size < MIN_BUDGET:
        raise ConfigError(f"embed.memory_budget = {value!r}: must be at least 1 MiB")
    return size


def available_memory() -> int:
    """Bytes of memory available to new work (Linux MemAvailable), else the physical total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# The overlap variants, named once here (advlens.kernels.metrics.VARIANTS is this tuple): the
# config module checks overlap.variant without importing the kernels (SciPy, torch).
OVERLAP_VARIANTS = ("overlap", "mixing", "pair", "share")
OVERLAP_SPACES = ("reduced", "map")  # the reduced (PCA) points t-SNE embeds, or its 2-D map


@dataclass(frozen=True)
class OverlapConfig:
    """The overlap metric (see docs/design.md): variant and k, plus a k-sweep.

    ``k = "auto"`` scales k with the sample (N / 100: N = 1,000 gives 10); an integer fixes it.
    ``variant`` and ``space`` choose the reported value (default: ``share`` on the reduced points
    t-SNE embeds; the map's value is reported beside it). ``bootstrap``: half-sample draws of the images for the interval (0: none).
    """

    k: int | str = setting("task", "auto", doc="neighbours per point: auto (N / 100) or an integer")
    variant: str = setting(
        "task", "share", doc="reported statistic: share, overlap, mixing or pair"
    )
    k_sweep: tuple[int, ...] = setting("task", (5, 10, 20, 50), doc="k values also reported")
    bootstrap: int = setting(
        "task", 200, doc="half-sample draws of the images for the interval (0: none)"
    )
    detector_seed: int = setting("task", 0, doc="the detector's folds: its own seed, not the map's")
    space: str = setting(
        "task",
        "reduced",
        doc="where the value is scored: reduced (the PCA points t-SNE embeds) or map",
    )

    def __post_init__(self) -> None:
        if isinstance(self.k, str) and self.k != "auto":
            raise ConfigError(
                f'overlap.k = {self.k!r}: give an integer >= 1, or "auto" (k = N / 100)'
            )
        if not isinstance(self.k, str) and self.k < 1:
            raise ConfigError(f'overlap.k = {self.k}: must be at least 1 (or "auto")')
        bad = [k for k in self.k_sweep if k < 1]
        if bad:
            raise ConfigError(f"overlap.k_sweep contains {bad[0]}: every k must be at least 1")
        if self.bootstrap < 0:
            raise ConfigError(f"overlap.bootstrap = {self.bootstrap}: must be >= 0 (0: none)")
        if self.space not in OVERLAP_SPACES:
            raise ConfigError(
                f"overlap.space = {self.space!r}: valid spaces are " + ", ".join(OVERLAP_SPACES)
            )
        if self.variant not in OVERLAP_VARIANTS:
            raise ConfigError(
                f"overlap.variant = {self.variant!r}: valid variants are "
                + ", ".join(OVERLAP_VARIANTS)
            )


@dataclass(frozen=True)
class OutputConfig:
    """Where results go: ``<root>/<name>/``."""

    root: str = setting("none", "runs", doc="folder that holds the run folders")
    name: str = setting("none", "default", doc="this run's folder name")
    dtype: str = setting("store", "float16", doc="store dtype: float16 or float32")
    overwrite: bool = setting("none", False, doc="replace a run folder written with other settings")

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"output.dtype = {self.dtype!r}: use float16 or float32")
        name = Path(self.name)
        if not self.name or name.is_absolute() or ".." in name.parts or name == Path("."):
            raise ConfigError(
                f"output.name = {self.name!r} must name a folder inside output.root "
                "(no '..', not absolute): use output.root to write elsewhere"
            )
        path = self.run_dir  # its first existing folder on the way up must be a folder
        while not path.exists() and path != path.parent:
            path = path.parent
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"output.root = {self.root!r}, output.name = {self.name!r}: {str(path)!r} is "
                "a file, not a folder: pick another output.root or output.name"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass(frozen=True)
class ScheduleConfig:
    """How layer tasks run: in process, on local Dask workers, or on a cluster."""

    workers: int = setting(
        "none",
        0,
        doc="0: automatic (in process on a CPU or one GPU, one worker per GPU when several)",
    )
    scheduler: str | None = setting(
        "none", None, doc="address of an existing scheduler, tcp://host:8786"
    )
    gpus: tuple[int, ...] = setting("none", (), doc="GPUs to use; empty: all visible")
    retries: int = setting("none", 1, doc="reruns of a failed layer task")

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"schedule.workers = {self.workers}: must be >= 0 (0: automatic)")
        if self.retries < 0:
            raise ConfigError(f"schedule.retries = {self.retries}: must be >= 0")
        if any(g < 0 for g in self.gpus):
            raise ConfigError(f"schedule.gpus = {list(self.gpus)}: GPU indices are >= 0")


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
        return jsonable(dataclasses.asdict(self))


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
    if isinstance(tp, type) and is_dataclass(tp):
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
            return parse_number(value)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ConfigError(
                f"{source}: {key} = {value!r}: expected a number or a fraction such as 8/255"
            ) from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a string")
        return str(value)
    return value


def parse_number(value: Any) -> float:
    """A float from a number or a string such as ``0.1``, ``8/255`` or ``1.5 / 2``."""
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        return float(num) / float(den)
    return float(value)


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


def store_identity(cfg: RunConfig, attack: str, norm: str, eps: float) -> dict[str, Any]:
    """The settings that shape one (attack, norm) store: a rerun must match them to resume."""
    ident = {f.name: shaping(getattr(cfg, f.name), "store") for f in fields(cfg)}
    ident = {k: v for k, v in ident.items() if v}
    ident["attack"] |= {"name": attack, "norm": norm, "eps": float(eps)}
    return ident
