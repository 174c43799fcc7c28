"""The report stage: metrics tables, figures and one self-contained ``report.html`` per run.

The run orchestration calls :func:`write_outputs` once at the end of a run and prints
:func:`summary`; ``advlens report RUN_DIR`` redoes the same from the files of a finished run,
and ``advlens compare`` puts several runs on one figure (:mod:`advlens.report.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from advlens._io import atomic_write, record
from advlens.report import tables
from advlens.report.html import write_report
from advlens.report.render import DEFAULT_KS, OWN_FIGURES, make_figures
from advlens.report.summary import AUC_GOOD, _classes, detector_summary, overlap_drops, summary
from advlens.report.tables import aggregate, read_metrics, write_metrics

__all__ = [
    "AUC_GOOD",
    "DEFAULT_KS",
    "OWN_FIGURES",
    "_classes",
    "aggregate",
    "detector_summary",
    "make_figures",
    "overlap_drops",
    "read_metrics",
    "summary",
    "write_metrics",
    "write_outputs",
]


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
