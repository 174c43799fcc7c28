"""The report's figures (matplotlib, Agg; no pyplot state): the paper's Figures 2-4 and more.

- :func:`layer_curve`: a metric per layer, one line per attack x norm (L2 blue, Linf orange),
  a band of +-1 standard deviation where repeats ran (Figure 2); also the detector AUC.
- :func:`maps_figure`: every layer's map; overlapping points grey, the clean points that do not
  overlap green, the perturbed ones red (Figure 3).
- :func:`label_map` / :func:`labels_grid`: maps coloured by true label (Figure 4).
- :func:`k_sweep_figure`, :func:`per_class_figure`, :func:`artefact_figure`.
- :func:`eps_curve_figure`, :func:`radius_figure`, :func:`matched_success_figure`: the eps
  sweep (advlens.eps_sweep).

Curves are a paper column wide (3.5 in at 300 dpi), or a page wide for many layers, with
rotated layer names whose size and stride keep them readable for 40+ layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from advlens._io import atomic_write
from advlens.report.tables import ARTEFACT_GAP, TaskMap

NORM_COLORS = {"l2": "#1f77b4", "linf": "#ff7f0e", "l1": "#9467bd"}
NORM_LABELS = {"l2": "L2", "linf": "Linf", "l1": "L1"}
CLEAN, PERTURBED, OVERLAPPING = "#2ca02c", "#d62728", "#c7c7c7"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
COLUMN_IN, PAGE_IN = 3.5, 7.16  # one paper column / the full page width
DPI = 300
MAP_DPI = 200  # grids of maps: big canvases, many points; 200 dpi keeps files small
RC = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def short(name: str, width: int = 24) -> str:
    """Shorten a long layer name in the middle so tick labels stay readable."""
    return name if len(name) <= width else name[: width // 2 - 2] + "…" + name[-(width // 2 - 1) :]


def norm_color(norm: str) -> str:
    return NORM_COLORS.get(str(norm).lower(), "#7f7f7f")


def series_label(attack: str, norm: str, eps: float | None, several_attacks: bool) -> str:
    text = NORM_LABELS.get(norm, str(norm))
    if eps is not None:
        text += f" ε={eps:.3g}"
    return f"{attack} {text}" if several_attacks else text


# ---------------------------------------------------------------- per-layer curves
def curve_size(n_layers: int, labels: Sequence[str] = ()) -> tuple[float, float]:
    """Figure size (inches) of a per-layer curve: a column for <= 16 layers, else a page."""
    width = COLUMN_IN if n_layers <= 16 else PAGE_IN
    longest = max((len(short(s)) for s in labels), default=6)
    fs = _tick_font(n_layers, width)[0]
    rotated = n_layers > 8
    room = longest * fs * (0.55 if rotated else 0.4) / 72  # space under the axis for names
    return width, round(2.2 + room, 2)


def _tick_font(n_layers: int, width: float) -> tuple[float, int]:
    """Tick-label font size (pt) and stride so that rotated names never overlap."""
    spacing = (width - 0.7) * 72 / max(n_layers, 1)  # points per layer along the axis
    fs = min(6.5, max(5.0, spacing / 1.25))
    stride = max(1, math.ceil(fs * 1.25 / spacing))
    return fs, stride


def layer_axis(ax: Axes, layers: Sequence[str], width: float) -> None:
    """Put (shortened, rotated, strided) layer names on the x axis."""
    n = len(layers)
    fs, stride = _tick_font(n, width)
    ax.set_xticks(range(n), minor=True)
    ticks = list(range(0, n, stride))
    ax.set_xticks(ticks)
    ax.set_xticklabels([short(layers[i]) for i in ticks], fontsize=fs)
    if n > 8:
        ax.tick_params(axis="x", labelrotation=90)
    else:
        for t in ax.get_xticklabels():
            t.set_rotation(40)
            t.set_horizontalalignment("right")
            t.set_rotation_mode("anchor")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer")


@dataclass
class Series:
    """One line of a per-layer plot: values (NaN where missing) and an optional band."""

    label: str
    color: str
    y: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    linestyle: str = "-"
    marker: str = "o"
    flags: np.ndarray | None = None  # layers to mark with a black cross
    extra: dict = field(default_factory=dict)


def agg_series(
    agg: Sequence[dict], layers: Sequence[str], metric: str = "overlap", *, band: bool = True
) -> list[Series]:
    """One :class:`Series` per (attack, norm) from aggregated rows (mean, +-std band)."""
    index = {name: i for i, name in enumerate(layers)}
    attacks = sorted({a["attack"] for a in agg})
    out: list[Series] = []
    for attack, norm in sorted({(a["attack"], a["norm"]) for a in agg}):
        rs = [a for a in agg if a["attack"] == attack and a["norm"] == norm]
        y, sd = np.full(len(layers), np.nan), np.zeros(len(layers))
        flags = np.zeros(len(layers), dtype=bool)
        for a in rs:
            if a["layer"] in index and a.get(f"{metric}_mean") is not None:
                i = index[a["layer"]]
                y[i], sd[i] = a[f"{metric}_mean"], a.get(f"{metric}_std") or 0.0
                flags[i] = bool(a.get("artefact_flag"))
        k = attacks.index(attack)
        has_band = band and any(a["n_repeats"] > 1 for a in rs)
        out.append(
            Series(
                series_label(attack, norm, rs[0].get("eps"), len(attacks) > 1),
                norm_color(norm),
                y,
                y - sd if has_band else None,
                y + sd if has_band else None,
                LINESTYLES[k % len(LINESTYLES)],
                MARKERS[k % len(MARKERS)],
                None,
                {"attack": attack, "norm": norm, "flags": flags},
            )
        )
    return out


def plot_series(
    series: Sequence[Series],
    layers: Sequence[str],
    out: str | Path,
    *,
    ylabel: str,
    ylim: tuple[float, float] | None = (-0.02, 1.02),
    threshold: float | None = None,
    title: str | None = None,
    xlabels: Sequence[str] | None = None,
) -> Path:
    """Draw per-layer series on one axis and save a PNG (size from :func:`curve_size`)."""
    w, h = curve_size(len(layers), xlabels or layers)
    with _rc():
        fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        ms = 3 if len(layers) <= 40 else 1.5
        flagged = False
        for s in series:
            ax.plot(
                x, s.y, s.linestyle, color=s.color, marker=s.marker, ms=ms, lw=1.2, label=s.label
            )
            if s.lo is not None and s.hi is not None:
                lo, hi = s.lo, s.hi
                if ylim is not None:
                    lo, hi = np.clip(lo, *ylim), np.clip(hi, *ylim)
                ax.fill_between(x, lo, hi, color=s.color, alpha=0.22, lw=0)
            if s.flags is not None and s.flags.any():
                ax.plot(x[s.flags], s.y[s.flags], "x", color="black", ms=5, mew=1,
                        label="_" if flagged else f"flag: |map − reduced| > {ARTEFACT_GAP}")  # fmt: skip
                flagged = True
        if threshold is not None:
            ax.axhline(threshold, color="0.3", lw=0.7, ls=(0, (4, 3)))
            ax.annotate(f"{threshold:g}", (0, threshold), xytext=(2, 2), textcoords="offset points",
                        fontsize=5.5, color="0.3")  # fmt: skip
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, axis="y", lw=0.3, alpha=0.6)
        layer_axis(ax, list(xlabels or layers), w)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        if series:
            ax.legend(frameon=False, ncol=1 if len(series) <= 3 else 2, loc="best")
        return save(fig, out)


def layer_curve(
    agg: Sequence[dict],
    layers: Sequence[str],
    out: str | Path,
    *,
    metric: str = "overlap",
    title: str | None = None,
) -> Path:
    """The paper's Figure 2: ``metric`` per layer per attack x norm, +-std bands over repeats."""
    return plot_series(agg_series(agg, layers, metric), layers, out, ylabel=metric, title=title)


def detector_figure(
    agg: Sequence[dict], layers: Sequence[str], out: str | Path, *, threshold: float = 0.95
) -> Path:
    """kNN-detector ROC AUC per layer (clean vs perturbed on the reduced points)."""
    series = agg_series(agg, layers, "auc")
    low = min([float(np.nanmin(s.y)) for s in series if np.isfinite(s.y).any()], default=0.5)
    ylim = (min(0.4, math.floor(low * 10) / 10), 1.02)
    return plot_series(series, layers, out, ylabel="detector AUC", ylim=ylim, threshold=threshold)


def artefact_figure(agg: Sequence[dict], layers: Sequence[str], out: str | Path) -> Path:
    """The reported statistic, calibrated, on the 2-D map (solid) beside that on the 50-D
    reduced points (dashed); crosses mark layers where the two differ by more than
    :data:`~advlens.report.tables.ARTEFACT_GAP` (a t-SNE artefact flag). Calibrated overlap
    for rows written before the space setting, raw overlap before calibration."""
    cal = any(a.get("calibrated_mean") is not None for a in agg)
    both = any(a.get("map_calibrated_mean") is not None for a in agg)
    on_map, reduced = (("map_calibrated", "reduced_calibrated") if both
                       else ("calibrated", "overlap_reduced_calibrated") if cal
                       else ("overlap", "overlap_reduced"))  # fmt: skip
    series: list[Series] = []
    for s in agg_series(agg, layers, on_map, band=False):
        red = next(r for r in agg_series(agg, layers, reduced, band=False)
                   if r.label == s.label)  # fmt: skip
        series += [
            Series(s.label + " map", s.color, s.y, marker=s.marker, flags=s.extra["flags"]),
            Series(s.label + " reduced", s.color, red.y, linestyle="--", marker="none"),
        ]
    name = (
        next((a.get("variant") for a in agg if a.get("variant")), "overlap") if both else "overlap"
    )
    return plot_series(series, layers, out, ylabel=f"calibrated {name}" if cal else "overlap")


# ---------------------------------------------------------------- maps
def _grid(n: int) -> tuple[int, int]:
    ncols = max(1, min(n, math.ceil(math.sqrt(n * 1.5))))
    return ncols, math.ceil(n / ncols)


def _point_size(n_points: int) -> float:
    return float(np.clip(3000 / max(n_points, 1), 0.4, 8))


def _map_axis(ax, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(True)
        ax.spines[side].set_linewidth(0.4)
    ax.set_title(title, fontsize=6, pad=2)


def _draw_overlap_map(ax, m: TaskMap) -> None:
    s = _point_size(len(m.xy))
    over = m.per_point > 0.5
    ax.scatter(*m.xy[over].T, s=s, c=OVERLAPPING, lw=0, rasterized=True)
    for perturbed, color in ((False, CLEAN), (True, PERTURBED)):
        sel = ~over & (m.is_perturbed == perturbed)
        ax.scatter(*m.xy[sel].T, s=s * 1.4, c=color, lw=0, rasterized=True)


def maps_figure(maps: Sequence[TaskMap], out: str | Path, *, title: str | None = None) -> Path:
    """The paper's Figure 3: every layer's joint map; overlapping points grey, the rest green
    (clean) or red (perturbed). Panel titles give the layer and its overlap."""
    ncols, nrows = _grid(len(maps))
    panel = 1.3
    with _rc():
        fig = Figure(
            figsize=(ncols * panel, nrows * panel + 0.45), dpi=MAP_DPI, layout="constrained"
        )
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, m in zip(axes, maps, strict=False):
            _draw_overlap_map(ax, m)
            _map_axis(ax, f"{short(m.row['layer'], 20)}\noverlap {m.row['overlap']:.2f}")
        for ax in axes[len(maps) :]:
            ax.set_axis_off()
        handles = [
            Line2D([], [], ls="", marker="o", ms=4, color=c, label=t)
            for c, t in ((OVERLAPPING, "overlapping"), (CLEAN, "clean, apart"),
                         (PERTURBED, "perturbed, apart"))
        ]  # fmt: skip
        fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
        if title:
            fig.suptitle(title, fontsize=8)
        return save(fig, out)


def class_names(n: int, classes: Sequence[str] | None = None) -> list[str]:
    if classes and len(classes) >= n:
        return list(classes)
    return [f"class {i}" for i in range(n)]


def _class_colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _draw_label_map(ax, m: TaskMap, colors) -> None:
    s = _point_size(len(m.xy))
    lab = np.asarray(m.labels, dtype=int)
    cols = np.array([colors[i % len(colors)] for i in lab])
    ax.scatter(*m.xy[~m.is_perturbed].T, s=s, c=cols[~m.is_perturbed], lw=0, rasterized=True)
    ax.scatter(*m.xy[m.is_perturbed].T, s=s * 1.6, c=cols[m.is_perturbed], marker="x",
               lw=0.35, rasterized=True)  # fmt: skip


def _label_legend(fig, names, colors, ncol: int) -> None:
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=c, label=t)
               for t, c in zip(names, colors, strict=False)]  # fmt: skip
    handles += [
        Line2D([], [], ls="", marker="o", ms=3, color="0.3", label="clean"),
        Line2D([], [], ls="", marker="x", ms=3, color="0.3", label="perturbed"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)


def label_map(
    m: TaskMap,
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """The paper's Figure 4: one layer's map coloured by true label (clean dots, perturbed x)."""
    n_classes = int(np.max(m.labels)) + 1 if len(m.labels) else 1
    names, colors = class_names(n_classes, classes), _class_colors(n_classes)
    span = np.ptp(m.xy, axis=0) if len(m.xy) else np.ones(2)
    aspect = float(np.clip(span[1] / span[0], 0.6, 1.3)) if span[0] > 0 else 1.0
    legend_rows = math.ceil((n_classes + 2) / 4)
    with _rc():
        fig = Figure(
            figsize=(COLUMN_IN, round((COLUMN_IN - 0.1) * aspect + 0.3 + 0.15 * legend_rows, 2)),
            dpi=DPI,
            layout="constrained",
        )
        ax = fig.add_subplot()
        _draw_label_map(ax, m, colors)
        _map_axis(ax, title or f"{m.row['layer']} (coloured by true label)")
        _label_legend(fig, names[:n_classes], colors, ncol=4)
        return save(fig, out)


def labels_grid(
    maps: Sequence[TaskMap],
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Every layer's map coloured by true label, in one grid."""
    n_classes = max(int(np.max(m.labels)) + 1 for m in maps) if maps else 1
    names, colors = class_names(n_classes, classes), _class_colors(n_classes)
    ncols, nrows = _grid(len(maps))
    with _rc():
        fig = Figure(figsize=(ncols * 1.3, nrows * 1.3 + 0.6), dpi=MAP_DPI, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, m in zip(axes, maps, strict=False):
            _draw_label_map(ax, m, colors)
            _map_axis(ax, short(m.row["layer"], 20))
        for ax in axes[len(maps) :]:
            ax.set_axis_off()
        _label_legend(fig, names[:n_classes], colors, ncol=min(6, n_classes + 2))
        if title:
            fig.suptitle(title, fontsize=8)
        return save(fig, out)


# ---------------------------------------------------------------- sweeps and breakdowns
def k_sweep_figure(sweeps: dict, layers: Sequence[str], out: str | Path) -> Path:
    """Overlap per layer for each k of the sweep; one panel per (attack, norm).

    ``sweeps`` maps (attack, norm) -> {layer: {k: overlap}}.
    """

    keys = sorted(sweeps)
    ks = sorted({k for per in sweeps.values() for d in per.values() for k in d})
    cmap = colormaps["viridis"]
    w, h = curve_size(len(layers), layers)
    with _rc():
        fig = Figure(figsize=(w, h + 1.5 * (len(keys) - 1)), dpi=DPI, layout="constrained")
        axes = fig.subplots(max(len(keys), 1), 1, sharex=True, squeeze=False).ravel()
        x = np.arange(len(layers))
        for ax, key in zip(axes, keys, strict=False):
            per = sweeps[key]
            for j, k in enumerate(ks):
                y = [per.get(name, {}).get(k, np.nan) for name in layers]
                c = cmap(j / max(len(ks) - 1, 1) * 0.9)
                ax.plot(x, y, "-o", ms=2, lw=1, color=c, label=f"k={k}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("overlap")
            ax.grid(True, axis="y", lw=0.3, alpha=0.6)
            ax.set_title(f"{key[0]} {NORM_LABELS.get(key[1], key[1])}", color=norm_color(key[1]))
            ax.legend(frameon=False, ncol=len(ks), loc="lower left")
        layer_axis(axes[-1], layers, w)
        return save(fig, out)


def per_class_figure(
    tables: dict, out: str | Path, *, classes: Sequence[str] | None = None
) -> Path:
    """Heat map of overlap per true class (columns) per layer (rows), one panel per
    (attack, norm). ``tables`` maps (attack, norm) -> (layer names, matrix (L, C))."""
    keys = sorted(tables)
    n_layers = max((len(t[0]) for t in tables.values()), default=1)
    n_classes = max((t[1].shape[1] for t in tables.values()), default=1)
    names = class_names(n_classes, classes)
    w = COLUMN_IN if len(keys) <= 1 else PAGE_IN
    h = 1.2 + 0.16 * n_layers + 0.05 * max(len(s) for s in names)
    with _rc():
        fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
        axes = fig.subplots(1, max(len(keys), 1), squeeze=False).ravel()
        im = None
        for ax, key in zip(axes, keys, strict=False):
            lnames, mat = tables[key]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                           interpolation="nearest")  # fmt: skip
            ax.set_xticks(range(mat.shape[1]), names[: mat.shape[1]], rotation=90, fontsize=5.5)
            ax.set_yticks(range(len(lnames)), [short(s, 20) for s in lnames], fontsize=5.5)
            ax.set_title(f"{key[0]} {NORM_LABELS.get(key[1], key[1])}", color=norm_color(key[1]))
            if mat.size <= 200:
                for (i, j), v in np.ndenumerate(mat):
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=4,
                                color="white" if v < 0.55 else "black")  # fmt: skip
        if im is not None:
            fig.colorbar(im, ax=list(axes), shrink=0.8, label="overlap")
        return save(fig, out)


# ---------------------------------------------------------------- helpers
def _rc():
    return rc_context(RC)


def save(fig: Figure, out: str | Path, **kwargs: Any) -> Path:
    """Write ``fig`` as PNG to ``out`` atomically (``kwargs`` for ``savefig``, e.g. ``dpi``)."""
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


# ---------------------------------------------------------------- eps sweep
def _by_group(layers: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in layers:
        out.setdefault(f"{d['attack']}-{d['norm']}", []).append(d)
    return out


def _sweep_axes(n: int, width: float = COLUMN_IN):
    fig = Figure(figsize=(width * max(1, n), 2.6), dpi=DPI // 2, layout="constrained")
    return fig, fig.subplots(1, max(1, n), squeeze=False)[0]


def _layer_lines(ax, rows: Sequence[dict], x_key: str, xlabel: str) -> None:
    cmap = colormaps["viridis"]
    for i, d in enumerate(rows):
        xs, ys = [0.0, *d[x_key]], [1.0, *d["calibrated"]]
        ax.plot(xs, ys, "o-", ms=2, lw=0.8, color=cmap(i / max(1, len(rows) - 1)),
                label=short(d["layer"], 14))  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set(xlabel=xlabel, ylabel="calibrated overlap", ylim=(-0.02, 1.02))
    ax.legend(fontsize=4, ncol=2)


def eps_curve_figure(layers: Sequence[dict], out: str | Path) -> Path:
    """Calibrated overlap against eps, one line per layer (from (0, 1)), one panel per
    attack x norm; the dotted line is the radius threshold 1/2."""
    return _sweep_figure(layers, out, "eps", "eps")


def matched_success_figure(layers: Sequence[dict], out: str | Path) -> Path:
    """Calibrated overlap against the attack success rate (the matched-success view)."""
    return _sweep_figure(layers, out, "success_rate", "attack success rate")


def _sweep_figure(layers: Sequence[dict], out, x: str, xlabel: str) -> Path:
    with _rc():
        groups = _by_group(layers)
        fig, axes = _sweep_axes(len(groups))
        for ax, (g, rows) in zip(axes, groups.items(), strict=False):
            _layer_lines(ax, rows, x, xlabel)
            ax.set_title(g, color=NORM_COLORS.get(rows[0]["norm"], "black"))
        return save(fig, out)


def radius_figure(layers: Sequence[dict], out: str | Path) -> Path:
    """Robustness radius per layer (eps at which the calibrated overlap falls below 1/2), one
    line per attack x norm; open markers at the largest eps: not reached there."""
    with _rc():
        groups = _by_group(layers)
        width = max(COLUMN_IN, 0.3 * max((len(r) for r in groups.values()), default=1))
        fig, axes = _sweep_axes(1, min(width, PAGE_IN))
        ax = axes[0]
        for g, rows in groups.items():
            color = NORM_COLORS.get(rows[0]["norm"], "black")
            top = max(max(d["eps"]) for d in rows)
            x = np.arange(len(rows))
            y = np.array([d["radius"] if d["radius"] is not None else np.nan for d in rows])
            ax.plot(x, y, "o-", ms=3, lw=0.8, color=color, label=g)
            miss = np.isnan(y)
            ax.plot(x[miss], np.full(miss.sum(), top), "o", mfc="none", color=color, ms=3)
            ax.set_xticks(x, [short(d["layer"], 14) for d in rows], rotation=45, ha="right")
        ax.set(ylabel="radius (eps at calibrated overlap 1/2)")
        ax.legend()
        return save(fig, out)
