"""(Re)write a run's figures and its self-contained report.html from the run folder's files.

The report is one HTML file: figures inlined as base64 PNG data, inline CSS, no scripts,
no network; it opens from disk and can be mailed as it is. It shows the provenance (config,
model, dataset, versions, device, timings), the per-layer overlap curve with spread bands,
the detector AUC per layer, the artefact check, the metrics table, every layer's map
(non-overlapping clean points green, perturbed red), the maps coloured by true label, the
k-sweep and the per-class breakdown.

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

from advlens.report.tables import (
    aggregate,
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
"""
FIG_CAPTIONS = {
    "layer_curve": "Overlap per layer (paper Fig. 2): L2 blue, Linf orange; "
    "bands: ±1 standard deviation over seeds, perplexities and engines where repeats ran.",
    "detector": "ROC AUC of a k-nearest-neighbour detector (clean vs perturbed, reduced points, "
    "train on half the pairs, score the other half) per layer; dashed: 0.95.",
    "artefact": "Artefact check: overlap on the 2-D map (solid) and on the reduced "
    "high-dimensional points (dashed); crosses: the two differ by more than 0.2.",
    "k_sweep": "Overlap per layer for several neighbourhood sizes k.",
    "per_class": "Overlap per true class (columns) and layer (rows).",
}


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
    ths = "".join(f'<th class="{"t" if i < 2 else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    return f'<div class="wrap"><table {attrs}><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def metrics_table(agg: Sequence[dict]) -> str:
    """One row per (attack, norm, layer): mean +- std over repeats, interval, flags, AUC."""
    head = ["layer", "norm", "attack", "eps", "engine", "repeats", "n", "success", "overlap",
            "interval", "mixing", "pair", "overlap reduced", "artefact", "AUC"]  # fmt: skip
    body = []
    for a in agg:
        rep = a["n_repeats"] > 1
        ov = _fmt(a["overlap_mean"]) + (f" ± {a['overlap_std']:.3f}" if rep else "")
        lo, hi = (
            (a["overlap_boot_low"], a["overlap_boot_high"]) if rep else (a["ci_low"], a["ci_high"])
        )
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
            *(f"<td>{_fmt(a[m + '_mean'])}</td>" for m in ("mixing", "pair", "overlap_reduced")),
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


def provenance_html(prov: dict) -> str:
    """Key facts as a table, timings as a table, the config and the rest as JSON."""
    if not prov:
        return "<p class=muted>provenance.json is missing.</p>"
    facts, blocks = [], []
    for key, value in prov.items():
        if key == "config":
            continue
        if key in ("timings", "timings_s") and isinstance(value, dict):
            total = sum(v for v in value.values() if isinstance(v, int | float))
            body = [
                f'<tr><td class="t">{_e(k)}</td><td>{_fmt(v, 1)}</td></tr>'
                for k, v in value.items()
            ]
            body.append(f'<tr><td class="t"><b>total</b></td><td><b>{total:.1f}</b></td></tr>')
            blocks.append("<h3>Timings (seconds)</h3>" + _table(["stage", "seconds"], body))
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
    """Build ``run_dir/report.html`` from metrics.json, provenance.json and figures/*.png."""
    from advlens.report import detector_summary, summary

    run_dir = Path(run_dir)
    rows, layers = read_metrics(run_dir)
    prov = read_provenance(run_dir)
    agg = aggregate(rows, layers)
    figs = run_dir / "figures"

    def fig(name: str) -> str:
        p = figs / f"{name}.png"
        return _figure(p, FIG_CAPTIONS.get(name, name)) if p.is_file() else ""

    parts = [
        f"<h1>advlens report: {_e(run_dir.resolve().name)}</h1>",
        f'<p class="muted">{len(layers)} layers, {len(rows)} layer tasks; written '
        f"{_dt.datetime.now().isoformat(timespec='seconds')} by advlens "
        f"{_e(prov.get('advlens_version', prov.get('version', '?')))}</p>",
        "<h2>Summary</h2>",
        f"<pre>{_e(summary(rows, run_dir))}</pre>",
        '<h2>Overlap per layer and detector AUC</h2><div class="row">',
        fig("layer_curve"),
        fig("detector"),
        "</div>",
    ]
    det = detector_summary(agg)
    if det:
        parts.append("<ul>" + "".join(f"<li>{_e(d)}</li>" for d in det) + "</ul>")
    parts += ["<h2>Artefact check</h2>", fig("artefact")]
    flagged = [a for a in agg if a["artefact_flag"]]
    parts.append(
        f"<p>{len(flagged)} layer(s) flagged: the overlap on the map and on the reduced points "
        "differ by more than 0.2 (highlighted in the table).</p>"
        if flagged
        else "<p>No layer flagged: map and reduced-point overlap agree within 0.2.</p>"
    )
    parts += ["<h2>Metrics</h2>", metrics_table(agg)]
    parts += ['<p class="muted">Full rows: metrics.csv / metrics.json beside this file.</p>']
    parts.append(
        "<h2>Maps (paper Fig. 3)</h2><p>"
        '<span class="sw" style="background:#c7c7c7"></span> overlapping '
        '<span class="sw" style="background:#2ca02c"></span> clean, not overlapping '
        '<span class="sw" style="background:#d62728"></span> perturbed, not overlapping</p>'
    )
    for p in own_figures(run_dir, "maps-*.png"):
        parts.append(_figure(p, f"Joint t-SNE maps, {p.stem[5:]}: every layer"))
    parts.append("<h2>Maps coloured by true label (paper Fig. 4)</h2>")
    grids = own_figures(run_dir, "labels-*.png")
    singles = [p for p in grids if not _is_grid(p, grids)]
    parts.append('<div class="row">')
    parts += [_figure(p, f"Last layer by true label, {p.stem[7:]}") for p in singles]
    parts.append("</div>")
    for p in (p for p in grids if p not in singles):
        parts.append(_figure(p, f"Every layer by true label, {p.stem[7:]}"))
    parts += ["<h2>k-sweep</h2>", fig("k_sweep"), "<h2>Per class</h2>", fig("per_class")]
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
        f"<title>advlens: {_e(run_dir.resolve().name)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    out = run_dir / "report.html"
    tmp = out.with_name("report.html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return out


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
    from advlens.report import make_figures, summary

    run_dir = Path(args.run_dir)
    rows, layers = read_metrics(run_dir)
    prov = read_provenance(run_dir)
    if not args.no_figures:
        make_figures(run_dir, rows, layers, prov, progress=not getattr(args, "quiet", False))
    out = write_report(run_dir)
    print(summary(rows, run_dir))
    print(f"report: {out}")
    return 0
