"""(Re)write a run's figures and its self-contained report.html from the run folder's files.

The report is one HTML file with everything inline (BokehJS, figures as base64 PNG data, CSS):
no network; it opens from disk and can be mailed as it is. It shows the clean and robust
accuracy, the per-layer overlap curve with its interval band and k and N beside it, the
detector AUC per layer, the artefact check, the metrics table with its columns explained,
every layer's map as an interactive, zoomable plot (hover: the sample's clean and perturbed
thumbnails, labels, the attack's outcome and norm; a click selects the image and its twin in
every layer's map; colour by clean/perturbed, true label or the label after the attack), the
k-sweep, the per-class breakdown, the static PNG figures and the provenance (config, model,
dataset, layers, versions, device, timings).

Examples:
  advlens report runs/default
  advlens report runs/wrn-linf --quiet
  xdg-open runs/default/report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from advlens._io import atomic_write
from advlens.report import interactive as ia
from advlens.report.render import make_figures
from advlens.report.summary import _classes, detector_summary, summary
from advlens.report.tables import (
    ARTEFACT_GAP,
    aggregate,
    load_maps,
    ok_rows,
    own_figures,
    read_metrics,
    read_provenance,
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;
 max-width:1180px;padding:0 18px 40px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.2em;margin-top:30px;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:16px 0 4px}.muted{color:#666;font-size:.9em}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
.row{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:14px}
.row img{width:100%}
figure{margin:8px 0}figcaption{font-size:.85em;color:#555;max-width:760px}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.82em;margin:6px 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}td.t,th.t{text-align:left}
tbody tr:nth-child(even){background:#fafafa}tr.flag td{background:#fff3cd}
.l2{color:#1f77b4;font-weight:600}.linf{color:#ff7f0e;font-weight:600}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:50%;vertical-align:middle}
.wrap{overflow-x:auto}
.mapgrid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:6px}
.legend{font-size:.88em;margin:4px 0}.legend .sw{margin:0 3px 0 8px}
.mk{color:#0072B2;font-size:1.1em}tr.moved td{background:#fde0c5}
.sel img{border:1px solid #999;float:left;margin:0 10px 6px 0}.sel table{clear:both}
dl.cols{font-size:.85em;display:grid;grid-template-columns:max-content 1fr;gap:2px 12px}
dl.cols dt{font-weight:600}dl.cols dd{margin:0}
"""
CURVE_CAPTION = (
    "Overlap per layer (paper Fig. 2). Band: the 95% bootstrap interval (over the points of "
    "the one map, or of the mean over repeats where seeds, perplexities or engines repeated). "
    "Click a legend entry to hide it; drag to pan, scroll or box to zoom."
)
MAPS_HELP = (
    "<p>Each map is zoomable (wheel, box) and draggable. Hover a point for the sample's clean "
    "and perturbed images, its true label, the model's prediction after the attack, whether the "
    "attack succeeded and the perturbation's norm. Click a point (or box/lasso-select several) "
    "to highlight that image and its twin in every layer's map; the panel lists, per layer, "
    "whether each overlaps the other side and the class most of the perturbed twin's clean "
    "neighbours have (shaded where it is no longer the true class): where the example leaves "
    "its class.</p>"
)
FIG_CAPTIONS = {
    "layer_curve": "The value per layer, calibrated (paper Fig. 2): L2 blue, Linf orange; "
    "bands: ±1 standard deviation over seeds, perplexities and engines where repeats ran.",
    "detector": "ROC AUC of a k-nearest-neighbour detector (clean vs perturbed, reduced points, "
    "train on half the pairs, score the other half) per layer; dashed: 0.95.",
    "artefact": "Artefact check: the reported statistic, calibrated, on the 2-D map (solid) "
    f"and on the reduced high-dimensional points t-SNE embeds (dashed); crosses: they differ by "
    f"more than {ARTEFACT_GAP}.",
    "k_sweep": "Overlap per layer for several neighbourhood sizes k.",
    "per_class": "Overlap per true class (columns) and layer (rows).",
}


COLUMNS = {
    "layer": "the tapped layer (input = the image itself)",
    "norm": "the threat model's norm (L2, Linf, L1)",
    "attack": "the attack that made the perturbed twins",
    "eps": "the perturbation budget ε in that norm (inputs in [0, 1])",
    "engine": "the t-SNE implementation(s) that made the maps",
    "repeats": "maps per layer (engines x seeds x perplexities)",
    "n": "N, the attacked samples: each map has 2N points (clean and perturbed)",
    "success": "share of the N attacks that changed the model's prediction",
    "value": "the reported statistic (overlap.variant, in overlap.space), calibrated: 1 = as "
    "mixed as random clean/perturbed labels, 0 = separated. ± std over repeats",
    "interval": "95% interval of the value: half-samples of the images for one map, the "
    "repeats' means otherwise",
    "map": "the reported statistic, calibrated, on the 2-D t-SNE map",
    "reduced": "the reported statistic, calibrated, on the PCA-reduced points t-SNE embeds",
    "overlap": "share of the 2N map points whose k nearest neighbours include one from the "
    "other side (clean vs perturbed), raw",
    "mixing": "mean share of a point's k neighbours that come from the other side",
    "pair": "share of points whose own twin is among their k nearest neighbours",
    "share": "mean share of other-side points among a point's k neighbours, its twin left out, "
    "raw (1/2 = random mixing), on the map",
    "artefact": f"flag: map and reduced value (calibrated) differ by more than {ARTEFACT_GAP}",
    "AUC": "ROC AUC of a kNN detector telling clean from perturbed on the reduced points "
    "(0.5 = chance, 1 = perfect)",
}


def column_help(names: Sequence[str]) -> str:
    """A definition list explaining the table columns ``names``."""
    items = "".join(f"<dt>{_e(n)}</dt><dd>{_e(COLUMNS[n])}</dd>" for n in names if n in COLUMNS)
    return f'<details open><summary>Columns</summary><dl class="cols">{items}</dl></details>'


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(v)


def png_info(data: bytes) -> tuple[int, int, float]:
    """Width, height (pixels) and dots per inch (72 when unknown) of a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    w, h = struct.unpack(">II", data[16:24])
    dpi, pos = 72.0, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"pHYs":
            ppu, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            dpi = ppu * 0.0254 if unit == 1 else dpi
            break
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return w, h, dpi


def img_tag(path: Path, alt: str) -> str:
    """An <img> with the PNG inlined as a data URI, shown at 150 px per inch."""
    data = path.read_bytes()
    w, h, dpi = png_info(data)
    css_w = round(w * 150 / dpi)
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<img alt="{_e(alt)}" width="{css_w}" height="{round(h * 150 / dpi)}" '
        f'src="data:image/png;base64,{b64}">'
    )


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{img_tag(path, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _table(head: Sequence[str], body: Iterable[str], attrs: str = "") -> str:
    ths = "".join(
        f'<th class="{"t" if i < 2 else ""}"'
        + (f' title="{_e(COLUMNS[h])}"' if h in COLUMNS else "")
        + f">{_e(h)}</th>"
        for i, h in enumerate(head)
    )
    return f'<div class="wrap"><table {attrs}><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def metrics_table(agg: Sequence[dict]) -> str:
    """One row per (attack, norm, layer): mean +- std over repeats, interval, flags, AUC."""
    head = ["layer", "norm", "attack", "eps", "engine", "repeats", "n", "success", "value",
            "interval", "map", "reduced", "overlap", "mixing", "pair", "share", "artefact",
            "AUC"]  # fmt: skip
    body = []
    for a in agg:
        rep = a["n_repeats"] > 1
        lead = "calibrated" if a.get("calibrated_mean") is not None else "overlap"
        ov = _fmt(a[f"{lead}_mean"]) + (f" ± {a[f'{lead}_std']:.3f}" if rep else "")
        one = ("calibrated_ci_low", "calibrated_ci_high") if lead == "calibrated" else (
            "ci_low", "ci_high")  # fmt: skip
        lo, hi = (a[f"{lead}_boot_low"], a[f"{lead}_boot_high"]) if rep else (a[one[0]], a[one[1]])
        interval = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "–"
        norm = _e(a["norm"])
        cells = [
            f'<td class="t">{_e(a["layer"])}</td>',
            f'<td class="t"><span class="{norm}">{norm}</span></td>',
            f'<td class="t">{_e(a["attack"])}</td>',
            f"<td>{'–' if a['eps'] is None else format(a['eps'], '.4g')}</td>",
            f'<td class="t">{_e(a["engines"])}</td>',
            f"<td>{a['n_repeats']}</td>",
            f"<td>{_fmt(a['n'])}</td>",
            f"<td>{_fmt(a['success_rate'])}</td>",
            f"<td>{ov}</td>",
            f"<td>{interval}</td>",
            *(
                f"<td>{_fmt(a[m + '_mean'])}</td>"
                for m in (
                    "map_calibrated",
                    "reduced_calibrated",
                    "overlap",
                    "mixing",
                    "pair",
                    "share",
                )
            ),
            f"<td>{'flag' if a['artefact_flag'] else ''}</td>",
            f"<td>{_fmt(a['auc_mean'])}</td>",
        ]
        cls = ' class="metric-row flag"' if a["artefact_flag"] else ' class="metric-row"'
        body.append(
            f'<tr{cls} data-layer="{_e(a["layer"])}" data-norm="{norm}" '
            f'data-attack="{_e(a["attack"])}">{"".join(cells)}</tr>'
        )
    return _table(head, body, 'id="metrics"')


def _rows_table(rows: Sequence[dict], keys: Sequence[str], attrs: str = "") -> str:
    body = ("<tr>" + "".join(f"<td{' class=t' if i < 2 else ''}>{_fmt(r.get(k))}</td>"
                             for i, k in enumerate(keys)) + "</tr>" for r in rows)  # fmt: skip
    return _table(keys, body, attrs)


# Per-task stage seconds, summed over the layer tasks: parts of "layers", not extra time.
TASK_STAGES = ("reduce", "embed", "overlap")


def timings_html(timings: dict) -> str:
    """Seconds per stage; the per-task stages are shown as parts of ``layers`` and left out of
    the total (they ran inside it, possibly in parallel)."""
    body, total = [], 0.0
    for k, v in timings.items():
        if not isinstance(v, int | float):
            continue
        part = k in TASK_STAGES and "layers" in timings
        total += 0.0 if part else float(v)
        name = f"&nbsp;&nbsp;of which {_e(k)} (summed over tasks)" if part else _e(k)
        body.append(f'<tr><td class="t">{name}</td><td>{_fmt(float(v), 1)}</td></tr>')
    body.append(f'<tr><td class="t"><b>total</b></td><td><b>{total:.1f}</b></td></tr>')
    return "<h3>Timings (seconds)</h3>" + _table(["stage", "seconds"], body)


def layers_html(layers: list) -> str:
    """The tapped layers as a table: position, name, per-sample shape, stored width."""
    body = []
    for i, layer in enumerate(layers):
        d = layer if isinstance(layer, dict) else {"name": layer}
        shape = d.get("shape")
        width = int(np.prod(shape)) if shape else None
        body.append(
            f'<tr><td class="t">{i}</td><td class="t">{_e(d.get("name"))}</td>'
            f'<td class="t">{_e(" x ".join(map(str, shape)) if shape else "–")}</td>'
            f"<td>{_fmt(width)}</td></tr>"
        )
    return f"<h3>Layers ({len(layers)})</h3>" + _table(["#", "layer", "shape", "width"], body)


def accuracy_rows(prov: dict, agg: Sequence[dict]) -> list[tuple[str, float | None, str]]:
    """(what, value, how) for the clean accuracy and the robust accuracy per attack and norm.

    Robust accuracy is the share of the whole split still classified correctly under attack:
    clean accuracy x (1 - success rate on the attacked, correctly classified samples).
    """
    acc = prov.get("accuracy") or {}
    clean = acc.get("clean")
    n_split = acc.get("n_split")
    out = [("clean accuracy", clean, f"on the {n_split or '?'} images of the split")]
    robust = acc.get("robust") or {}
    for a in agg:
        key = f"{a['attack']} {a['norm']}"
        if key in robust or clean is None or a.get("success_rate") is None:
            continue
        robust[key] = clean * (1 - a["success_rate"])
    for key, v in robust.items():
        eps = next((a.get("eps") for a in agg if f"{a['attack']} {a['norm']}" == key), None)
        how = "clean accuracy x (1 - attack success rate)"
        out.append((f"robust accuracy, {key}" + (f" ε={eps:.4g}" if eps else ""), v, how))
    return out


def accuracy_html(prov: dict, agg: Sequence[dict]) -> str:
    rows = accuracy_rows(prov, agg)
    if rows[0][1] is None:
        return "<p class=muted>Clean accuracy was not recorded in provenance.json.</p>"
    body = [
        f'<tr><td class="t">{_e(w)}</td><td>{_fmt(v, 4)}</td><td class="t">{_e(h)}</td></tr>'
        for w, v, h in rows
    ]
    return _table(["", "value", "how"], body, 'id="accuracy"')


def provenance_html(prov: dict) -> str:
    """Key facts as a table, timings and layers as tables, the config and the rest as JSON."""
    if not prov:
        return "<p class=muted>provenance.json is missing.</p>"
    facts, blocks = [], []
    for key, value in prov.items():
        if key == "config":
            continue
        if key in ("timings", "timings_s") and isinstance(value, dict):
            blocks.append(timings_html(value))
        elif key == "layers" and isinstance(value, list):
            blocks.append(layers_html(value))
        elif isinstance(value, dict | list):
            blocks.append(f"<h3>{_e(key)}</h3><pre>{_e(json.dumps(value, indent=1))}</pre>")
        else:
            facts.append(f'<tr><td class="t">{_e(key)}</td><td class="t">{_e(value)}</td></tr>')
    out = _table(["item", "value"], facts) if facts else ""
    out += "".join(blocks)
    if "config" in prov:
        out += (
            "<details><summary>Full configuration</summary>"
            f"<pre>{_e(json.dumps(prov['config'], indent=1))}</pre></details>"
        )
    return out


def write_report(run_dir: str | Path) -> Path:
    """Build ``run_dir/report.html`` from metrics.json, provenance.json, the task maps, the
    activation stores (hover details, thumbnails) and figures/*.png."""

    run_dir = Path(run_dir)
    rows, layers = read_metrics(run_dir)
    prov = read_provenance(run_dir)
    agg = aggregate(rows, layers)
    figs = run_dir / "figures"

    def fig(name: str) -> str:
        p = figs / f"{name}.png"
        return _figure(p, FIG_CAPTIONS.get(name, name)) if p.is_file() else ""

    live = {"head": "", "curve": "", "maps": "", "script": ""}
    if ia.bokeh_available():
        live = ia.sections(run_dir, agg, layers, load_maps(run_dir, rows), prov, _classes(prov))
    curve = (
        f"<figure>{live['curve']}<figcaption>{_e(CURVE_CAPTION)}</figcaption></figure>"
        if live["curve"]
        else fig("layer_curve")
    )
    parts = [
        f"<h1>advlens report: {_e(run_dir.resolve().name)}</h1>",
        f'<p class="muted">{len(layers)} layers, {len(rows)} layer tasks; written '
        f"{_dt.datetime.now().isoformat(timespec='seconds')} by advlens "
        f"{_e(prov.get('advlens_version', prov.get('version', '?')))}</p>",
        "<h2>Summary</h2>",
        f"<pre>{_e(summary(rows, run_dir))}</pre>",
        accuracy_html(prov, agg),
        "<h2>Value per layer</h2>",
        curve,
        "<h2>Detector AUC</h2>",
        fig("detector"),
    ]
    det = detector_summary(agg)
    if det:
        parts.append("<ul>" + "".join(f"<li>{_e(d)}</li>" for d in det) + "</ul>")
    parts += ["<h2>Artefact check</h2>", fig("artefact")]
    flagged = [a for a in agg if a["artefact_flag"]]
    parts.append(
        f"<p>{len(flagged)} layer(s) flagged: the calibrated value on the map and on the "
        f"reduced points differ by more than {ARTEFACT_GAP} (highlighted in the table).</p>"
        if flagged
        else "<p>No layer flagged: the calibrated value on the map and on the reduced points agree within "
        f"{ARTEFACT_GAP}.</p>"
    )
    parts += ["<h2>Metrics</h2>", metrics_table(agg), column_help(list(COLUMNS))]
    parts += ['<p class="muted">Full rows: metrics.csv / metrics.json beside this file.</p>']
    if live["maps"]:
        parts += ["<h2>Maps, every layer (paper Fig. 3 and 4)</h2>", MAPS_HELP, live["maps"]]
    parts += ["<h2>k-sweep</h2>", fig("k_sweep"), "<h2>Per class</h2>", fig("per_class")]
    parts.append(_static_maps(figs, open_=not live["maps"]))
    if any(a["n_repeats"] > 1 for a in agg):
        keys = ["layer", "norm", "attack", "engine", "seed", "perplexity", "overlap",
                "overlap_reduced", "auc", "seconds_embed"]  # fmt: skip
        parts.append(
            f"<h2>All repeats</h2><details><summary>{len(ok_rows(rows))} rows</summary>"
            f"{_rows_table(ok_rows(rows), keys)}</details>"
        )
    failed = [r for r in rows if r.get("error")]
    if failed:
        keys = ["layer", "norm", "attack", "engine", "seed", "perplexity", "error"]
        parts += [f"<h2>Failed tasks ({len(failed)})</h2>", _rows_table(failed, keys)]
    parts += ["<h2>Provenance</h2>", provenance_html(prov)]
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>advlens: {_e(run_dir.resolve().name)}</title><style>{CSS}</style>"
        f"{live['head']}</head><body>{''.join(parts)}{live['script']}</body></html>\n"
    )
    out = run_dir / "report.html"
    return atomic_write(out, doc.encode("utf-8"))


def _static_maps(figs: Path, *, open_: bool) -> str:
    """The PNG map figures (as written to figures/): shown when no interactive maps exist,
    otherwise folded away."""
    parts = [_figure(p, FIG_CAPTIONS["layer_curve"]) for p in [figs / "layer_curve.png"]
             if p.is_file() and not open_]  # fmt: skip
    parts.append(
        "<p>"
        '<span class="sw" style="background:#c7c7c7"></span> overlapping '
        '<span class="sw" style="background:#2ca02c"></span> clean, not overlapping '
        '<span class="sw" style="background:#d62728"></span> perturbed, not overlapping</p>'
    )
    for p in own_figures(figs.parent, "maps-*.png"):  # a user's maps-mine.png stays out
        parts.append(_figure(p, f"Joint t-SNE maps, {p.stem[5:]}: every layer"))
    grids = own_figures(figs.parent, "labels-*.png")
    singles = [p for p in grids if not _is_grid(p, grids)]
    parts.append('<div class="row">')
    parts += [_figure(p, f"Last layer by true label, {p.stem[7:]}") for p in singles]
    parts.append("</div>")
    for p in (p for p in grids if p not in singles):
        parts.append(_figure(p, f"Every layer by true label, {p.stem[7:]}"))
    body = "".join(parts)
    if open_:
        return "<h2>Maps (paper Fig. 3 and 4)</h2>" + body
    return (
        "<h2>Static figures</h2><details><summary>The PNG figures of figures/ (curve, maps "
        f"grids, maps by true label)</summary>{body}</details>"
    )


def _is_grid(p: Path, all_labels: Sequence[Path]) -> bool:
    """labels-<attack>-<norm>.png is a grid; labels-<attack>-<norm>-<layer>.png a single map:
    a file is a single map when a shorter labels file is its prefix."""
    return not any(q != p and p.stem.startswith(q.stem + "-") for q in all_labels)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/default")
    parser.add_argument(
        "--no-figures", action="store_true", help="reuse the PNGs in RUN_DIR/figures as they are"
    )


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    rows, layers = read_metrics(run_dir)
    prov = read_provenance(run_dir)
    if not args.no_figures:
        make_figures(run_dir, rows, layers, prov, progress=not getattr(args, "quiet", False))
    out = write_report(run_dir)
    print(summary(rows, run_dir))
    print(f"report: {out}")
    return 0
