"""The interactive parts of report.html: linked layer maps and the layer curve (Bokeh).

One ``ColumnDataSource`` per (attack, norm) holds one row per sample: its clean and perturbed
coordinates in every layer's map (columns ``x{j}c y{j}c x{j}p y{j}p``), whether each point has
a neighbour from the other side (``o{j}c o{j}p``), the true class of most of its clean
neighbours (``n{j}c n{j}p``), labels, the attack's outcome and one thumbnail sprite (clean |
perturbed PNG). Every layer's figure draws from that one source, so a tap, box or lasso
selection is the same rows in every map (a sample and its twin, highlighted in every layer),
and each thumbnail is written once per sample, not per point or per layer.

Clean points are circles, perturbed points triangles (Okabe-Ito blue and vermillion; points
that overlap the other side grey), so the two differ in shape as well as colour. Resources
are inlined (``bokeh.resources.INLINE``): the page needs no network.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from bokeh import models as bm
from bokeh.embed import components
from bokeh.model import Model
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.models.annotations import Title
from bokeh.models.renderers import DataRenderer
from bokeh.models.widgets import Div, RadioButtonGroup
from bokeh.plotting import figure
from bokeh.resources import Resources
from bokeh.transform import transform
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from advlens._optional import has
from advlens.report.figures import NORM_LABELS, norm_color, short
from advlens.report.tables import TaskMap
from advlens.store import ActivationStore

log = logging.getLogger(__name__)
CLEAN, PERTURBED, OVERLAPPING = "#0072B2", "#D55E00", "#BBBBBB"  # Okabe-Ito blue, vermillion
# Paul Tol's "muted" scheme: ten classes readable under the common colour-vision deficiencies
CLASS_COLORS = ("#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE",
                "#882255", "#44AA99", "#999933", "#AA4499", "#777777")  # fmt: skip
SCHEMES = ("clean / perturbed", "true label", "label after attack")
MAP_PX = 330
THUMB_SCALE = 2  # thumbnails are drawn at twice their pixel size, unsmoothed

TOOLTIP = """
<div style="max-width:260px">
<img src="@thumb" style="image-rendering:pixelated;width:@tw{0}px;border:1px solid #999"
 alt="clean | perturbed">
<div style="font-size:11px">clean | perturbed<br>
<b>$name</b> point of sample @sample (dataset index @index)<br>
true: @true_name; clean prediction: @pc_name<br>
after the attack: <b>@pp_name</b> (attack @outcome)<br>
perturbation norm: @pnorm{0.0000}</div></div>
"""

# The selection panel: the first selected sample, and per layer whether its two points overlap
# the other side and which class most of their clean neighbours have.
PANEL_JS = """
const ix = src.selected.indices;
if (ix.length === 0) { panel.text = empty; return; }
const d = src.data, i = ix[0];
let rows = "";
for (let j = 0; j < layers.length; j++) {
  const moved = d["n" + j + "p"][i] !== d.label[i];
  rows += "<tr" + (moved ? " class='moved' style='background:#fde0c5'" : "") + "><td class='t'>" + layers[j] + "</td><td>"
    + (d["o" + j + "c"][i] ? "yes" : "no") + "</td><td>" + (d["o" + j + "p"][i] ? "yes" : "no")
    + "</td><td class='t'>" + names[d["n" + j + "p"][i]] + "</td></tr>";
}
panel.text = "<div class='sel' data-sample='" + d.sample[i] + "' data-count='" + ix.length
  + "'><img src='" + d.thumb[i] + "' style='image-rendering:pixelated;width:"
  + (2 * d.tw[i]) + "px'><p><b>sample " + d.sample[i] + "</b> (dataset index " + d.index[i]
  + "; " + ix.length + " selected): true " + d.true_name[i] + ", after the attack "
  + d.pp_name[i] + " (attack " + d.outcome[i] + ")</p><table><thead><tr><th class='t'>layer"
  + "</th><th>clean overlaps</th><th>perturbed overlaps</th><th class='t'>perturbed twin's"
  + " clean neighbours are mostly</th></tr></thead><tbody>" + rows + "</tbody></table></div>";
"""

COLOR_JS = """
const a = cb_obj.active;
for (let i = 0; i < renderers.length; i++) {
  const spec = {field: fields[i][a], transform: mappers[i][a]};
  for (const g of [renderers[i].glyph, renderers[i].selection_glyph,
                   renderers[i].nonselection_glyph]) { g.fill_color = spec; }
}
"""


def bokeh_available() -> bool:
    return has("bokeh")


def resources() -> str:
    """The inline BokehJS the report needs (core, WebGL, widgets; 1.8 MB): script tags holding
    the library itself, no URLs. ``bokeh.resources.INLINE`` would add MathJax and tables."""

    return Resources(mode="inline", components=["bokeh", "bokeh-gl", "bokeh-widgets"]).render()


# ---------------------------------------------------------------- sample data
def _store_path(run_dir: Path, maps: Sequence[TaskMap]) -> Path:
    row = maps[0].row
    store = row.get("store")
    return Path(store) if store else run_dir / f"{row['attack']}-{row['norm']}.zarr"


def _input_shape(prov: dict, width: int) -> tuple[int, ...] | None:
    for layer in prov.get("layers") or []:
        if isinstance(layer, dict) and layer.get("name") == "input":
            return tuple(int(s) for s in layer["shape"])
    side = math.isqrt(width)
    if side * side == width:
        return (1, side, side)
    side = math.isqrt(width // 3)
    return (3, side, side) if 3 * side * side == width else None


def _png(img: np.ndarray) -> str:
    """A data URI of a (H, W) or (H, W, 3) image with values in [0, 1]."""

    a = np.clip(np.nan_to_num(img) * 255 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sprites(clean: np.ndarray, perturbed: np.ndarray) -> list[str]:
    """One PNG per sample: the clean image beside its perturbed twin, 1 px grey between.

    ``clean`` and ``perturbed`` are (N, C, H, W) in [0, 1], C = 1 or 3.
    """
    n, c, h, w = clean.shape
    pair = np.full((n, h, 2 * w + 1, c), 0.6, dtype=np.float32)
    pair[:, :, :w] = clean.transpose(0, 2, 3, 1)
    pair[:, :, w + 1 :] = perturbed.transpose(0, 2, 3, 1)
    return [_png(p[..., 0] if c == 1 else p) for p in pair]


def load_samples(run_dir: Path, maps: Sequence[TaskMap], prov: dict) -> dict[str, object]:
    """Per-sample fields for the hover: from the activation store where it exists, else from
    the maps alone (labels only). Thumbnails come from the store's ``input`` layer."""
    n = len(maps[0].xy) // 2
    out: dict[str, object] = {"label": np.asarray(maps[0].labels[:n], dtype=np.int64)}
    path = _store_path(run_dir, maps)
    if not path.is_dir():
        return out

    try:
        store = ActivationStore.open(path)
        s = store.samples()
        if len(s["label"]) != n:
            return out
        out.update(s)
        if "input" in store.layers:
            shape = _input_shape(prov, store.widths["input"])
            if shape is not None:
                x = store.joint("input").astype(np.float32).reshape(2 * n, *shape)
                out["sprites"] = sprites(x[:n], x[n:])
                out["thumb_width"] = (2 * shape[-1] + 1) * THUMB_SCALE
    except Exception:  # the hover loses detail; the report must still be written
        log.exception("%s: sample details unavailable in the interactive maps", path)
    return out


def majority_neighbour_class(m: TaskMap, k: int) -> np.ndarray:
    """For every point of the map: the most common true label among its ``k`` nearest clean
    points (itself excluded), ties to the lower label."""

    n = len(m.xy) // 2
    k = max(1, min(k, n - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(m.xy[:n])
    _, idx = nn.kneighbors(m.xy)
    self_hit = idx[:n, 0] == np.arange(n)
    nbr = np.where(self_hit[:, None], idx[:n, 1:], idx[:n, :k])  # clean: drop itself
    nbr = np.concatenate([nbr, idx[n:, :k]])
    lab = m.labels[:n][nbr]
    counts = np.stack([(lab == c).sum(1) for c in range(int(m.labels.max()) + 1)], axis=1)
    return counts.argmax(1)


def build_source(
    maps: Sequence[TaskMap], samples: dict, classes: Sequence[str] | None
) -> tuple[ColumnDataSource, list[str]]:
    """The one ColumnDataSource every layer's figure of one (attack, norm) draws from."""

    n = len(maps[0].xy) // 2
    label = np.asarray(samples["label"], dtype=np.int64)
    pc = np.asarray(samples.get("pred_clean", label), dtype=np.int64)
    pp = np.asarray(samples.get("pred_perturbed", label), dtype=np.int64)
    n_classes = int(max(label.max(), pc.max(), pp.max())) + 1
    names = list(classes or [])[:n_classes]
    names += [str(c) for c in range(len(names), n_classes)]
    success = samples.get("success")
    data: dict[str, object] = {
        "sample": np.arange(n),
        "index": np.asarray(samples.get("index", np.arange(n))),
        "label": label,
        "pred_c": pc,
        "pred_p": pp,
        "true_name": [names[c] for c in label],
        "pc_name": [names[c] for c in pc],
        "pp_name": [names[c] for c in pp],
        "outcome": ["?"] * n
        if success is None
        else ["succeeded" if s else "failed" for s in success],
        "pnorm": np.asarray(samples.get("norm", np.full(n, np.nan)), dtype=np.float32),
        "thumb": samples.get("sprites") or [""] * n,
        "tw": np.full(n, samples.get("thumb_width", 0), dtype=np.int16),
    }
    for j, m in enumerate(maps):
        xy = m.xy.astype(np.float32)
        ov = m.per_point > 0.5
        near = majority_neighbour_class(m, int(m.row.get("k") or 10)).astype(np.int8)
        data |= {f"x{j}c": xy[:n, 0], f"y{j}c": xy[:n, 1], f"x{j}p": xy[n:, 0],
                 f"y{j}p": xy[n:, 1], f"o{j}c": ov[:n].astype(np.uint8),
                 f"o{j}p": ov[n:].astype(np.uint8), f"n{j}c": near[:n],
                 f"n{j}p": near[n:]}  # fmt: skip
    return ColumnDataSource(data, name=f"src-{maps[0].row['attack']}-{maps[0].row['norm']}"), names


def point_size(n_points: int) -> float:
    """Marker size in screen pixels: large for a few points, 3 px at 2 x 10^4."""
    return float(np.clip(16 * n_points**-0.17, 2.5, 9))


def map_panel(
    maps: Sequence[TaskMap], samples: dict, classes: Sequence[str] | None, key: str
) -> tuple[RadioButtonGroup, Div, list[figure], list[str]]:
    """Models for one (attack, norm): colour switch, selection panel, one figure per layer.

    Returns (controls, panel, figures, class names): Bokeh models of one document.
    """

    src, names = build_source(maps, samples, classes)
    palette = [CLASS_COLORS[c % len(CLASS_COLORS)] for c in range(len(names))]
    by_class = bm.LinearColorMapper(palette=palette, low=-0.5, high=len(names) - 0.5)
    side = {
        "c": bm.LinearColorMapper(palette=[CLEAN, OVERLAPPING], low=-0.5, high=1.5),
        "p": bm.LinearColorMapper(palette=[PERTURBED, OVERLAPPING], low=-0.5, high=1.5),
    }
    size = point_size(len(maps[0].xy))
    layers = [m.row["layer"] for m in maps]
    renderers, fields, mappers, figs = [], [], [], []
    for j, layer in enumerate(layers):
        pan = bm.PanTool()
        tools = [pan, bm.WheelZoomTool(), bm.BoxZoomTool(), bm.TapTool(), bm.BoxSelectTool(),
                 bm.LassoSelectTool(), bm.ResetTool()]  # fmt: skip
        f = figure(
            title=Title(text=f"{j}: {layer}", text_font_size="11px"), width=MAP_PX, height=MAP_PX, tools=tools,
            output_backend="webgl", match_aspect=True, name=f"map-{key}-{j}",
            toolbar_location="above",
        )  # fmt: skip
        f.axis.visible = False
        f.grid.visible = False
        f.toolbar.logo = None
        f.toolbar.active_drag = pan
        own: list[DataRenderer] = []
        for which, marker, label_field in (("c", "circle", "pred_c"), ("p", "triangle", "pred_p")):
            r = f.scatter(
                f"x{j}{which}", f"y{j}{which}", source=src, marker=marker, size=size,
                fill_color=transform(f"o{j}{which}", side[which]), line_color=None, fill_alpha=0.75,
                name="clean" if which == "c" else "perturbed",
            )  # fmt: skip
            r.selection_glyph = r.glyph.clone(
                size=size * 2.2, line_color="black", line_width=1.5, fill_alpha=1.0
            )
            r.nonselection_glyph = r.glyph.clone(fill_alpha=0.12)
            renderers.append(r)
            own.append(r)
            fields.append([f"o{j}{which}", "label", label_field])
            mappers.append([side[which], by_class, by_class])
        f.add_tools(bm.HoverTool(renderers=own, tooltips=TOOLTIP))
        figs.append(f)
    switch = RadioButtonGroup(labels=list(SCHEMES), active=0, name=f"colour-{key}")
    switch.js_on_change(
        "active", bm.CustomJS(args=dict(renderers=renderers, fields=fields, mappers=mappers),
                           code=COLOR_JS),
    )  # fmt: skip
    empty = (
        "<p class='muted'>Click a point (or drag a box with the select tool) to follow that "
        "image and its twin through every layer.</p>"
    )
    panel = Div(text=empty, name=f"selection-{key}", width=2 * MAP_PX, styles={"font-size": "12px"})
    src.selected.js_on_change(
        "indices",
        bm.CustomJS(args=dict(src=src, panel=panel, layers=layers, names=names, empty=empty),
                 code=PANEL_JS),
    )  # fmt: skip
    return switch, panel, figs, names


# ---------------------------------------------------------------- the layer curve
def curve_figure(agg: Sequence[dict], layers: Sequence[str], *, metric: str = "overlap") -> figure:
    """Overlap per layer per (attack, norm) with its interval as a band, k and N in the title:
    a one-map interval is the bootstrap over points, a repeated map's the bootstrap of the mean
    over repeats."""

    index = {name: i for i, name in enumerate(layers)}
    ks = sorted({a["k"] for a in agg if a.get("k") is not None})
    ns = sorted({a["n"] for a in agg if a.get("n") is not None})
    title = (f"{metric} per layer: k = {', '.join(map(str, ks)) or '?'}, N = "
             f"{', '.join(map(str, ns)) or '?'} samples (2N points per map)")  # fmt: skip
    f = figure(
        title=title, height=340, sizing_mode="stretch_width", y_range=bm.Range1d(start=-0.02, end=1.02),
        tools="pan,wheel_zoom,box_zoom,reset,save", name="curve", output_backend="webgl",
    )  # fmt: skip
    f.toolbar.logo = None
    attacks = sorted({a["attack"] for a in agg})
    dashes = ("solid", "dashed", "dotted", "dashdot")
    markers = ("circle", "square", "triangle", "diamond")
    renderers: list[DataRenderer] = []
    for attack, norm in sorted({(a["attack"], a["norm"]) for a in agg}):
        rs = sorted(
            (a for a in agg if (a["attack"], a["norm"]) == (attack, norm) and a["layer"] in index),
            key=lambda a: index[a["layer"]],
        )
        rs = [a for a in rs if a.get(f"{metric}_mean") is not None]
        if not rs:
            continue
        lo, hi = zip(*(_interval(a, metric) for a in rs), strict=True)
        eps = rs[0].get("eps")
        label = f"{attack} {NORM_LABELS.get(norm, norm)}" + (f" ε={eps:.4g}" if eps else "")
        src = ColumnDataSource({
            "x": [index[a["layer"]] for a in rs], "y": [a[f"{metric}_mean"] for a in rs],
            "lo": [np.nan if v is None else v for v in lo],
            "hi": [np.nan if v is None else v for v in hi],
            "layer": [a["layer"] for a in rs], "reps": [a["n_repeats"] for a in rs],
            "series": [f"{attack} {norm}"] * len(rs),
        })  # fmt: skip
        colour = norm_color(norm)
        k = attacks.index(attack)
        f.varea("x", "lo", "hi", source=src, fill_color=colour, fill_alpha=0.2,
                legend_label=label)  # fmt: skip
        f.line("x", "y", source=src, color=colour, line_width=2, line_dash=dashes[k % 4],
               legend_label=label)  # fmt: skip
        renderers.append(
            f.scatter(
                "x",
                "y",
                source=src,
                color=colour,
                size=7,
                marker=markers[k % 4],
                legend_label=label,
            )  # fmt: skip
        )
    tips = [("", "@series"), ("layer", "@layer"), (metric, "@y{0.000}"),
            ("interval", "[@lo{0.000}, @hi{0.000}]"), ("repeats", "@reps")]  # fmt: skip
    f.add_tools(HoverTool(renderers=renderers, tooltips=tips))
    f.xaxis.ticker = list(range(len(layers)))
    f.xaxis.major_label_overrides = {i: _short(name) for i, name in enumerate(layers)}
    f.xaxis.major_label_orientation = 0.9 if len(layers) > 8 else 0.0
    f.yaxis.axis_label = metric
    f.legend.location = "bottom_left"
    f.legend.click_policy = "hide"
    return f


def _interval(a: dict, metric: str) -> tuple[float | None, float | None]:
    if a["n_repeats"] > 1:
        return a.get(f"{metric}_boot_low"), a.get(f"{metric}_boot_high")
    return (a.get("ci_low"), a.get("ci_high")) if metric == "overlap" else (None, None)


def _short(name: str) -> str:
    return short(name)


# ---------------------------------------------------------------- assembly
def sections(
    run_dir: Path,
    agg: Sequence[dict],
    layers: Sequence[str],
    maps: dict[tuple[str, str], list[TaskMap]],
    prov: dict,
    classes: Sequence[str] | None,
) -> dict[str, str]:
    """HTML snippets for the report: ``head`` (inline BokehJS), ``curve`` and ``maps`` (the
    divs) and ``script`` (the one document's data and views). All models share one document,
    so a selection in one layer's map shows in every other."""

    models: dict[str, Model] = {}
    if agg:
        models["curve"] = curve_figure(agg, layers)
    blocks = []
    for (attack, norm), ms in sorted(maps.items()):
        key = f"{attack}-{norm}"
        samples = load_samples(run_dir, ms, prov)
        switch, panel, figs, names = map_panel(ms, samples, classes, key)
        models[f"switch-{key}"], models[f"panel-{key}"] = switch, panel
        models |= {f"map-{key}-{j}": f for j, f in enumerate(figs)}
        blocks.append((attack, norm, key, len(figs), names, "sprites" in samples, len(ms[0].xy)))
    if not models:
        return {"head": "", "curve": "", "maps": "", "script": ""}
    script, divs = components(models)
    html_maps = []
    for attack, norm, key, n_figs, names, thumbs, n_points in blocks:
        legend = "".join(
            f'<span class="sw" style="background:{CLASS_COLORS[c % len(CLASS_COLORS)]}"></span>'
            f"{_esc(name)} " for c, name in enumerate(names)
        )  # fmt: skip
        note = (
            ""
            if thumbs
            else (
                " <i>No thumbnails: the run's activation store or its input layer is missing.</i>"
            )
        )
        html_maps.append(
            f'<section class="imaps" data-key="{_esc(key)}"><h3>{_esc(attack)} '
            f"{_esc(NORM_LABELS.get(norm, norm))}: {n_points} points per map</h3>"
            f'<p class="legend"><span class="mk">●</span> clean '
            f'<span class="mk" style="color:{PERTURBED}">▲</span> perturbed; colour by: '
            f"{divs[f'switch-{key}']}</p>"
            f'<p class="legend muted">clean / perturbed: <span class="sw" '
            f'style="background:{CLEAN}"></span>clean, <span class="sw" '
            f'style="background:{PERTURBED}"></span>perturbed, <span class="sw" '
            f'style="background:{OVERLAPPING}"></span>has a neighbour from the other side. '
            f"Labels: {legend}{note}</p>"
            f"{divs[f'panel-{key}']}"
            f'<div class="mapgrid">{"".join(divs[f"map-{key}-{j}"] for j in range(n_figs))}</div>'
            "</section>"
        )
    return {
        "head": resources(),
        "curve": divs.get("curve", ""),
        "maps": "".join(html_maps),
        "script": script,
    }


def _esc(v) -> str:
    return html.escape(str(v), quote=True)
