"""The report stage: metrics tables, figures and one self-contained ``report.html`` per run.

The run orchestration calls :func:`write_outputs` once at the end of a run and prints
:func:`summary`; ``advlens report RUN_DIR`` redoes the same from the files of a finished run,
and ``advlens compare`` puts several runs on one figure (:mod:`advlens.report.compare`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from advlens.report import tables
from advlens.report.tables import aggregate, ok_rows, read_metrics, write_metrics

__all__ = [
    "aggregate",
    "detector_summary",
    "make_figures",
    "overlap_drops",
    "read_metrics",
    "summary",
    "write_metrics",
    "write_outputs",
]
log = logging.getLogger(__name__)
AUC_GOOD = 0.95
DEFAULT_KS = (5, 10, 20, 50)
OWN_FIGURES = ("layer_curve", "detector", "artefact", "maps-", "labels-", "k_sweep", "per_class")


def write_outputs(
    run_dir: str | Path,
    rows: list[dict],
    layers: list[str],
    provenance: dict,
    *,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Write everything a finished run shows: metrics, figures and ``report.html``.

    Parameters
    ----------
    run_dir : the run folder (``runs/<name>``); task maps are read from ``run_dir/tasks``.
    rows : metrics rows, one per layer x norm x attack x engine x seed x perplexity.
    layers : the layer names in tap order.
    provenance : config dict, versions, model/dataset identity, device, timings; written to
        ``provenance.json``.

    Returns
    -------
    dict mapping output names (``metrics.json``, ``figures/layer_curve.png``, ``report.html``,
    ...) to their paths.
    """
    from advlens._io import atomic_write, record
    from advlens.report.html import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = ["metrics.json", "metrics.csv", "metrics_aggregate.csv", "provenance.json"]
    record(run_dir, *names, "report.html")
    out = write_metrics(run_dir, rows, layers)
    prov = run_dir / "provenance.json"
    atomic_write(prov, json.dumps(tables._plain(provenance), indent=1).encode())
    out["provenance.json"] = prov
    out.update(make_figures(run_dir, rows, layers, provenance, progress=progress))
    out["report.html"] = write_report(run_dir)
    return out


def make_figures(
    run_dir: str | Path,
    rows: Sequence[dict],
    layers: Sequence[str],
    provenance: dict | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Render every figure into ``run_dir/figures``; a figure that fails is logged and
    skipped, so that a plotting problem never loses a finished run's metrics."""
    from advlens import progress as prog
    from advlens._io import record, remove_written
    from advlens.report import figures as F

    run_dir, layers = Path(run_dir), list(layers)
    fig_dir = run_dir / "figures"
    agg = aggregate(rows, layers)
    ok = ok_rows(rows)
    maps = tables.load_maps(run_dir, rows)
    classes = _classes(provenance or {})
    jobs: list[tuple[str, Callable[[Path], Path]]] = []
    if ok:
        jobs.append(("layer_curve.png", lambda p: F.layer_curve(agg, layers, p)))
    if any(r.get("auc") is not None for r in ok):
        jobs.append(
            ("detector.png", lambda p: F.detector_figure(agg, layers, p, threshold=AUC_GOOD))
        )
    if any(r.get("overlap_reduced") is not None for r in ok):
        jobs.append(("artefact.png", lambda p: F.artefact_figure(agg, layers, p)))
    for (attack, norm), ms in sorted(maps.items()):
        stem = f"{F.slug(attack)}-{F.slug(norm)}"
        title = f"{attack} {F.NORM_LABELS.get(norm, norm)}"
        last = ms[-1]
        jobs += [
            (f"maps-{stem}.png", lambda p, ms=ms, t=title: F.maps_figure(ms, p, title=t)),
            (
                f"labels-{stem}-{F.slug(last.row['layer'])}.png",
                lambda p, m=last, t=title: F.label_map(
                    m, p, classes=classes, title=f"{t}: {m.row['layer']}, by true label"
                ),
            ),
            (
                f"labels-{stem}.png",
                lambda p, ms=ms, t=title: F.labels_grid(ms, p, classes=classes, title=t),
            ),
        ]
    if maps:
        ks = _ks(provenance or {})
        jobs.append(("k_sweep.png", lambda p: F.k_sweep_figure(_sweeps(maps, ks), layers, p)))
        jobs.append(
            ("per_class.png", lambda p: F.per_class_figure(_per_class(maps), p, classes=classes))
        )
    out: dict[str, Path] = {}
    record(run_dir, *(f"figures/{name}" for name, _ in jobs))  # before writing: see advlens._io
    for name, job in prog.track(jobs, "report figures", unit="fig", enabled=progress):
        try:
            out[f"figures/{name}"] = job(fig_dir / name)
        except Exception:  # a broken figure must not lose the rest of the report
            log.exception("figure %s failed; the report is written without it", name)
    # Figures of an earlier pass (another attack, norm or layer set) must not reach the
    # report; only those advlens wrote are removed, a user's own PNG stays.
    stale = [p for p in fig_dir.glob("*.png") if f"figures/{p.name}" not in out]
    _, left = remove_written(run_dir, stale if fig_dir.is_dir() else [])
    left = [name for name in left if Path(name).name.startswith(OWN_FIGURES)]
    if left:
        log.warning("figures: left %s, which advlens did not write", ", ".join(left))
    return out


def _ks(provenance: dict) -> tuple[int, ...]:
    ks = (provenance.get("config") or {}).get("overlap", {}).get("k_sweep") or DEFAULT_KS
    return tuple(int(k) for k in ks)


def _classes(provenance: dict) -> list[str] | None:
    from advlens.report.figures import FASHION_MNIST_CLASSES

    ds = provenance.get("dataset")
    if isinstance(ds, dict) and ds.get("classes"):
        return list(ds["classes"])
    name = json.dumps(ds if ds is not None else (provenance.get("config") or {}).get("data"))
    return list(FASHION_MNIST_CLASSES) if "fashion" in name.lower() else None


def _sweeps(maps: dict, ks: Sequence[int]) -> dict:
    return {key: {m.row["layer"]: tables.row_sweep(m, ks) for m in ms} for key, ms in maps.items()}


def _per_class(maps: dict) -> dict:
    out = {}
    for key, ms in maps.items():
        per = [tables.per_class_overlap(m) for m in ms]
        n_classes = max((max(p) + 1 for p in per if p), default=1)
        mat = np.full((len(ms), n_classes), np.nan)
        for i, p in enumerate(per):
            for c, v in p.items():
                mat[i, c] = v
        out[key] = ([m.row["layer"] for m in ms], mat)
    return out


# ---------------------------------------------------------------- console summary
def _curves(agg: Sequence[dict], metric: str) -> dict[tuple, list[tuple[str, float]]]:
    """(attack, norm) -> [(layer, mean value)] in layer order, missing values skipped."""
    out: dict[tuple, list] = {}
    for a in sorted(agg, key=lambda a: a["layer_index"] if a["layer_index"] is not None else 0):
        v = a.get(f"{metric}_mean")
        if v is not None and math.isfinite(v):
            out.setdefault((a["attack"], a["norm"]), []).append((a["layer"], v))
    return out


def overlap_drops(agg: Sequence[dict], top: int = 3) -> dict[tuple, list[tuple[str, str, float]]]:
    """Per (attack, norm): the ``top`` layers where overlap falls most from the layer before,
    as (layer, previous layer, drop) with drop > 0, largest first."""
    out = {}
    for key, curve in _curves(agg, "overlap").items():
        drops = [(b[0], a[0], a[1] - b[1]) for a, b in zip(curve, curve[1:], strict=False)]
        out[key] = sorted((d for d in drops if d[2] > 0), key=lambda d: -d[2])[:top]
    return out


def detector_summary(agg: Sequence[dict], threshold: float = AUC_GOOD) -> list[str]:
    """Per (attack, norm): the earliest layer whose detector AUC exceeds ``threshold`` and the
    layer with the highest AUC."""
    lines = []
    for (attack, norm), curve in sorted(_curves(agg, "auc").items()):
        first = next(((name, v) for name, v in curve if v > threshold), None)
        best = max(curve, key=lambda t: t[1])
        head = f"{attack} {norm}: "
        head += (
            f"AUC > {threshold:g} first at {first[0]} ({first[1]:.3f})"
            if first
            else f"no layer reaches AUC > {threshold:g}"
        )
        lines.append(f"{head}; highest AUC {best[1]:.3f} at {best[0]}")
    return lines


def summary(rows: Sequence[dict], run_dir: str | Path | None = None) -> str:
    """A short end-of-run summary: where the outputs are, the layers where overlap drops most,
    the detector layers, artefact flags and failed tasks."""
    agg = aggregate(rows)
    lines = []
    if run_dir is not None:
        lines.append(f"advlens: results in {Path(run_dir)}/ (report.html, metrics.csv, figures/)")
    drops_all = overlap_drops(agg)
    for (attack, norm), curve in sorted(_curves(agg, "overlap").items()):
        eps = next((a.get("eps") for a in agg if (a["attack"], a["norm"]) == (attack, norm)), None)
        head = f"{attack} {norm}" + (f" eps={eps:g}" if eps is not None else "")
        text = f"{head}: overlap {curve[0][1]:.2f} at {curve[0][0]} -> {curve[-1][1]:.2f} at {curve[-1][0]}"
        drops = drops_all.get((attack, norm), [])
        if drops:
            text += "; drops most at " + ", ".join(
                f"{layer} (-{d:.2f} after {prev})" for layer, prev, d in drops
            )
        lines.append(text)
    lines += [f"detector: {line}" for line in detector_summary(agg)]
    flags = [a for a in agg if a.get("artefact_flag")]
    if flags:
        lines.append(
            f"artefact check: {len(flags)} layer(s) where map and reduced-point overlap differ "
            f"by > {tables.ARTEFACT_GAP:g}: "
            + ", ".join(f"{a['layer']} ({a['norm']})" for a in flags[:8])
        )
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append(
            f"{len(failed)} of {len(rows)} task(s) failed (rerun the same command to retry "
            "them; the 'error' column of metrics.csv has the messages):"
        )
        lines += [
            f"  {r.get('task_id') or r.get('layer')}: {str(r['error']).splitlines()[0][:200]}"
            for r in failed[:20]
        ]
        if len(failed) > 20:
            lines.append(f"  ... and {len(failed) - 20} more")
    if not agg:
        lines.append("no layer produced a result")
    return "\n".join(lines)
