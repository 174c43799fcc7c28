"""The Python API: :func:`analyze` a model on images in a notebook, :func:`load_run` a finished run.

Both return a :class:`Result`: the per-layer table, a curve figure, each layer's map, the HTML
report. :func:`analyze` builds a :class:`~advlens.config.RunConfig` and calls
:func:`advlens.run.run`, the same implementation ``advlens run`` uses, with the model and
images given here in place of the ones a config names.

Examples
--------
>>> import advlens
>>> result = advlens.analyze(model, images, labels, norm="linf", eps="8/255", n=500,
...                          attack__n_iter=20, out="runs/mine")  # doctest: +SKIP
>>> result.table[0]["overlap"], result.plot(), result.map("fc1")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from advlens._optional import require
from advlens.config import from_dict, load
from advlens.data import Dataset
from advlens.errors import ConfigError, closest
from advlens.models import weights_digest
from advlens.report import figures as F
from advlens.report import summary
from advlens.report.html import write_report
from advlens.report.tables import METRICS, aggregate, load_maps, read_metrics
from advlens.results import TaskMap
from advlens.run import run

# Columns of the notebook table (the full rows are in Result.table).
HTML_COLUMNS = ("layer", "norm", "eps", "overlap", "ci_low", "ci_high", "overlap_reduced", "auc")


@dataclass
class Result:
    """A finished run: its folder, metrics rows (``metrics.json``), layers and provenance."""

    run_dir: Path
    table: list[dict[str, Any]]
    layers: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def aggregate(self) -> list[dict[str, Any]]:
        """One row per attack x norm x layer: mean, std and bootstrap interval over repeats."""

        return aggregate(self.table, self.layers)

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas)."""

        pd = require("pandas", "Result.to_pandas()")
        return pd.DataFrame(self.table)

    def plot(self, metric: str = "overlap") -> Figure:
        """The per-layer curve of ``metric`` (one line per attack x norm) as a matplotlib Figure."""

        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r} is not a metric; {closest(metric, METRICS)}")
        w, h = F.curve_size(len(self.layers), self.layers)
        with F._rc():
            fig = Figure(figsize=(w, h), dpi=150, layout="constrained")
            ax = fig.add_subplot()
            x = np.arange(len(self.layers))
            for s in F.agg_series(self.aggregate(), self.layers, metric):
                ax.plot(x, s.y, s.linestyle, color=s.color, marker=s.marker, ms=3, label=s.label)
                if s.lo is not None and s.hi is not None:
                    ax.fill_between(x, s.lo, s.hi, color=s.color, alpha=0.22, lw=0)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, axis="y", lw=0.3, alpha=0.6)
            F.layer_axis(ax, self.layers, w)
            ax.set_ylabel(metric)
            ax.legend(frameon=False, loc="best")
        return fig

    def points(self, layer: str, *, attack: str | None = None, norm: str | None = None) -> TaskMap:
        """The 2-D map of ``layer`` as a :class:`~advlens.report.tables.TaskMap` (``xy``,
        ``is_perturbed``, ``labels``, ``per_point``; clean points first, then their twins)."""

        maps = load_maps(self.run_dir, self.table)
        keys = [k for k in maps if attack in (None, k[0]) and norm in (None, k[1])]
        if not keys:
            raise ConfigError(
                f"no maps for attack={attack!r} norm={norm!r}; the run has "
                + ", ".join(f"{a} {n}" for a, n in maps)
            )
        if len(keys) > 1:
            raise ConfigError(
                f"the run has maps for {', '.join(f'{a} {n}' for a, n in keys)}: pass norm= "
                "(and attack=) to pick one"
            )
        by_layer = {m.row["layer"]: m for m in maps[keys[0]]}
        if layer not in by_layer:
            raise ConfigError(f"no map for layer {layer!r}; {closest(layer, list(by_layer))}")
        return by_layer[layer]

    def map(self, layer: str, *, attack: str | None = None, norm: str | None = None) -> Figure:
        """The joint t-SNE map of ``layer`` as a matplotlib Figure: overlapping points grey,
        the rest clean or perturbed."""

        m = self.points(layer, attack=attack, norm=norm)
        with F._rc():
            fig = Figure(figsize=(3.2, 3.2), dpi=150, layout="constrained")
            ax = fig.add_subplot()
            F._draw_overlap_map(ax, m)
            F._map_axis(ax, f"{layer} ({m.row['norm']}): overlap {m.row['overlap']:.2f}")
        return fig

    def report(self, path: str | Path | None = None) -> Path:
        """Write the self-contained ``report.html`` (the run's, copied to ``path`` if given)."""

        out = write_report(self.run_dir)
        if path is None:
            return out
        path = Path(path)
        if path.resolve() != out.resolve():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, path)
        return path

    def summary(self) -> str:
        """The end-of-run lines ``advlens run`` prints."""

        return summary(self.table, self.run_dir)

    def __repr__(self) -> str:
        return f"<advlens.Result {self.run_dir}: {len(self.table)} rows>\n{self.summary()}"

    def _repr_html_(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(c)}</th>" for c in HTML_COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in HTML_COLUMNS) + "</tr>"
            for r in self.table
        )
        return (
            f"<div><b>advlens run</b> <code>{e(str(self.run_dir))}</code>: "
            f"{len(self.layers)} layers, {len(self.table)} rows"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return "" if v is None else str(v)


def load_run(path: str | Path) -> Result:
    """The :class:`Result` of a finished run folder (one holding ``metrics.json``)."""

    run_dir = Path(path).resolve()
    rows, layers = read_metrics(run_dir)
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    return Result(run_dir=run_dir, table=rows, layers=layers, provenance=prov)


def analyze(
    model: torch.nn.Module | str,
    images: Any = None,
    labels: Any = None,
    *,
    layers: str | list[str] = "all",
    attack: str | list[str] = "apgd-ce",
    norm: str | list[str] = "linf",
    eps: float | str | dict[str, float | str] | None = None,
    n: int = 1000,
    engine: str = "auto",
    out: str | Path | None = None,
    classes: list[str] | None = None,
    progress: bool = True,
    **settings: Any,
) -> Result:
    """Attack the correctly classified ``images`` and score every layer of ``model``.

    Parameters
    ----------
    model : a ``torch.nn.Module`` taking images in [0, 1] and returning logits (it is put in
        eval mode and on the configured device), or a model name as in ``model.name``.
    images : (N, C, H, W) or (N, H, W) array or tensor in [0, 1]; or a dataset name
        (``fashion-mnist``, ``cifar10``, ``synthetic``, ``folder``; set ``data__path``).
    labels : (N,) integer class labels (not with a dataset name).
    layers : ``all``, ``auto`` or layer names / globs (see ``advlens layers``).
    attack, norm : one or several; attacks as in ``attack.name``, norms linf, l2, l1.
    eps : radius (number or fraction string ``"8/255"``), or ``{norm: radius}``; None: the
        dataset default (8/255 and 0.5 for arrays, as in RobustBench).
    n : attacked samples, drawn class-stratified from the correctly classified ones.
    engine : t-SNE engine (``auto``: advlens' torch engine on a GPU, else openTSNE).
    out : the run folder; None: a new temporary folder. An existing run folder with the same
        settings is resumed, one with other settings refused (``output__overwrite=True``).
    classes : class names (default ``"0"``, ``"1"``, ...).
    progress : progress bars (log lines when not on a terminal).
    **settings : any other config key as ``section__key=value``, e.g. ``attack__n_iter=20``,
        ``embed__seeds=[0, 1, 2]``; ``advlens config`` lists them.
    """

    base = load().to_dict()
    data = None
    values: dict[str, Any] = {
        "data.n": n,
        "layers.select": [layers] if isinstance(layers, str) else list(layers),
        "attack.norms": [norm] if isinstance(norm, str) else list(norm),
        "embed.engine": engine,
    }
    names = [attack] if isinstance(attack, str) else list(attack)
    values["attack.name"], values["attack.names"] = names[0], names if len(names) > 1 else []
    if eps is not None:
        values["attack.eps"] = (
            dict(eps) if isinstance(eps, dict) else {v: eps for v in values["attack.norms"]}
        )
    root = Path(out).resolve().parent if out is not None else Path(tempfile.mkdtemp("-advlens"))
    values["output.root"] = str(root)
    values["output.name"] = Path(out).name if out is not None else "run"
    for key, value in settings.items():
        values[_setting_key(key, base)] = value
    if isinstance(images, str):
        if labels is not None:
            raise ConfigError("analyze: give labels only with image arrays, not a dataset name")
        values["data.source"] = images
    else:
        data = _dataset(images, labels, classes)
        # The run folder's identity (resume or refuse) must change with the images.
        values["data.source"], values["data.path"] = "arrays", f"sha1:{_digest_data(data)}"
    module: torch.nn.Module | None = None  # in memory, else a model name in the config
    if not isinstance(model, str):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"analyze: model must be a torch.nn.Module or a model name, got "
                f"{type(model).__name__}"
            )
        values["model.name"] = f"{type(model).__name__} (in memory)"
        values["model.checkpoint"] = f"sha1:{_digest_model(model)}"
        module = model
    else:
        values["model.name"] = model
    for key, value in values.items():
        section, name = key.split(".")
        base[section][name] = value
    cfg = from_dict(base, source="advlens.analyze")
    run(cfg, progress=progress, model=module, data=data)
    return load_run(cfg.output.run_dir)


def _setting_key(key: str, base: dict[str, dict]) -> str:
    """``attack__n_iter`` -> ``attack.n_iter``; a bare name is accepted when one section has it."""
    if "__" in key:
        section, name = key.split("__", 1)
        if section not in base:
            raise ConfigError(f"analyze: unknown section in {key!r}; {closest(section, base)}")
        if name not in base[section]:
            raise ConfigError(
                f"analyze: unknown setting {key!r}; {closest(name, base[section])} "
                f"(in {section}; `advlens config` lists every key)"
            )
        return f"{section}.{name}"
    owners = [s for s, d in base.items() if key in d]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if owners:
        raise ConfigError(
            f"analyze: {key!r} is a setting of {' and '.join(owners)}: write "
            + " or ".join(f"{s}__{key}" for s in owners)
        )
    every = [f"{s}__{k}" for s, d in base.items() for k in d]
    raise ConfigError(f"analyze: unknown setting {key!r}; {closest(key, every)}")


def _dataset(images, labels, classes):
    """A :class:`~advlens.data.Dataset` from arrays or tensors, checked as a run needs it."""

    if images is None or labels is None:
        raise ConfigError("analyze: pass images and labels (or a dataset name as images)")
    x = _numpy(images).astype(np.float32, copy=False)
    y = _numpy(labels)
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[:, None]
    if x.ndim != 4:
        raise ConfigError(f"analyze: images must be (N, C, H, W) or (N, H, W), got {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"analyze: labels must be {len(x)} integers (one per image), got {y.dtype} {y.shape}"
        )
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ConfigError(
            f"analyze: images must lie in [0, 1] (normalisation belongs inside the model, as in "
            f"RobustBench), got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]"
        )
    if len(y) and y.min() < 0:
        raise ConfigError(f"analyze: labels must be >= 0, got {int(y.min())}")
    n_classes = int(y.max()) + 1 if len(y) else 0
    names = tuple(classes) if classes is not None else tuple(str(i) for i in range(n_classes))
    if len(names) < n_classes:
        raise ConfigError(f"analyze: {len(names)} class names for labels up to {n_classes - 1}")
    return Dataset(
        np.ascontiguousarray(x), y.astype(np.int64), np.arange(len(y), dtype=np.int64),
        "arrays", names,
    )  # fmt: skip


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _digest_data(data) -> str:
    h = hashlib.sha1()
    for a in (data.images, data.labels):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _digest_model(model) -> str:
    """Hash of the class, weights and buffers: a changed model makes a new store, never a
    stale one."""

    return weights_digest(model, hashlib.sha1(type(model).__qualname__.encode()))[:16]


__all__ = ["Result", "analyze", "load_run"]
