"""Render every figure of a run into ``run_dir/figures`` (:func:`make_figures`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from advlens import progress as prog
from advlens._io import record, remove_written, slug
from advlens.report import figures as F
from advlens.report import tables
from advlens.report.summary import AUC_GOOD, _classes
from advlens.report.tables import aggregate, ok_rows

log = logging.getLogger(__name__)
DEFAULT_KS = (5, 10, 20, 50)
OWN_FIGURES = ("layer_curve", "detector", "artefact", "maps-", "labels-", "k_sweep", "per_class")


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
    run_dir, layers = Path(run_dir), list(layers)
    fig_dir = run_dir / "figures"
    agg = aggregate(rows, layers)
    ok = ok_rows(rows)
    maps = tables.load_maps(run_dir, rows)
    classes = _classes(provenance or {})
    jobs: list[tuple[str, Callable[[Path], Path]]] = []
    if ok:
        lead = "calibrated" if any(r.get("calibrated") is not None for r in ok) else "overlap"
        jobs.append(("layer_curve.png", lambda p: F.layer_curve(agg, layers, p, metric=lead)))
    if any(r.get("auc") is not None for r in ok):
        jobs.append(
            ("detector.png", lambda p: F.detector_figure(agg, layers, p, threshold=AUC_GOOD))
        )
    if any(r.get("overlap_reduced") is not None for r in ok):
        jobs.append(("artefact.png", lambda p: F.artefact_figure(agg, layers, p)))
    for (attack, norm), ms in sorted(maps.items()):
        stem = f"{slug(attack)}-{slug(norm)}"
        title = f"{attack} {F.NORM_LABELS.get(norm, norm)}"
        last = ms[-1]
        jobs += [
            (f"maps-{stem}.png", partial(F.maps_figure, ms, title=title)),
            (
                f"labels-{stem}-{slug(last.row['layer'])}.png",
                partial(
                    F.label_map,
                    last,
                    classes=classes,
                    title=f"{title}: {last.row['layer']}, by true label",
                ),
            ),
            (f"labels-{stem}.png", partial(F.labels_grid, ms, classes=classes, title=title)),
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
