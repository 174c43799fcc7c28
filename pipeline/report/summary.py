"""The console summary of a run, and the class names the report shows."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from advlens.data.fashion_mnist import FASHION_CLASSES
from advlens.report.tables import aggregate
from advlens.results import ARTEFACT_GAP

AUC_GOOD = 0.95


def _classes(provenance: dict) -> list[str] | None:
    ds = provenance.get("dataset")
    if isinstance(ds, dict) and ds.get("classes"):
        return list(ds["classes"])
    name = json.dumps(ds if ds is not None else (provenance.get("config") or {}).get("data"))
    return list(FASHION_CLASSES) if "fashion" in name.lower() else None


def _curves(agg: Sequence[dict], metric: str) -> dict[tuple, list[tuple[str, float]]]:
    """(attack, norm) -> [(layer, mean value)] in layer order, missing values skipped."""
    out: dict[tuple, list] = {}
    for a in sorted(agg, key=lambda a: a["layer_index"] if a["layer_index"] is not None else 0):
        v = a.get(f"{metric}_mean")
        if v is not None and math.isfinite(v):
            out.setdefault((a["attack"], a["norm"]), []).append((a["layer"], v))
    return out


def overlap_drops(
    agg: Sequence[dict], top: int = 3, metric: str = "calibrated"
) -> dict[tuple, list[tuple[str, str, float]]]:
    """Per (attack, norm): the ``top`` layers where ``metric`` (default: the reported calibrated
    value) falls most from the layer before, as (layer, previous layer, drop) with drop > 0,
    largest first."""
    out = {}
    for key, curve in _curves(agg, metric).items():
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
    """A short end-of-run summary: where the outputs are, the layers where the reported value
    drops most, the detector layers, artefact flags and failed tasks."""
    agg = aggregate(rows)
    lines = []
    if run_dir is not None:
        lines.append(f"advlens: results in {Path(run_dir)}/ (report.html, metrics.csv, figures/)")
    drops_all = overlap_drops(agg)
    # The reported statistic (overlap.variant on overlap.space), as the report table shows it.
    first = rows[0] if rows else {}
    what = f"calibrated {first.get('variant', 'overlap')} ({first.get('space', 'map')})"
    for (attack, norm), curve in sorted(_curves(agg, "calibrated").items()):
        eps = next((a.get("eps") for a in agg if (a["attack"], a["norm"]) == (attack, norm)), None)
        head = f"{attack} {norm}" + (f" eps={eps:g}" if eps is not None else "")
        text = f"{head}: {what} {curve[0][1]:.2f} at {curve[0][0]} -> {curve[-1][1]:.2f} at {curve[-1][0]}"
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
            f"artefact check: {len(flags)} layer(s) where the map's and the reduced points' calibrated values differ "
            f"by > {ARTEFACT_GAP:g}: " + ", ".join(f"{a['layer']} ({a['norm']})" for a in flags[:8])
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
