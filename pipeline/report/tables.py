"""Metrics tables: write/read ``metrics.json`` and ``metrics.csv``, aggregate repeats, read maps.

A run's metrics rows (one per layer x norm x attack x engine x seed x perplexity, keys in
:data:`ROW_KEYS`) are written as-is; where a layer ran several times (seeds, perplexities,
engines) :func:`aggregate` gives one row per (attack, norm, layer) with the mean, the standard
deviation (ddof=1) and an interval over the repeats: a percentile bootstrap of the mean with at
least :data:`MIN_PERCENTILE_REPEATS` repeats, else the plain range ("n repeats, range").
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advlens._io import WRITTEN, atomic_write, written
from advlens.errors import StoreError
from advlens.overlap import overlap_sweep

# The task-file contract lives with the compute side (advlens.results); re-exported here.
from advlens.results import (  # noqa: F401
    ARTEFACT_GAP,
    ROW_SCHEMA,
    UNIT_KEYS,
    TaskMap,
    check_row,
    read_task_map,
    read_task_row,
)

log = logging.getLogger(__name__)
ROW_KEYS = (
    "attack", "norm", "eps", "layer", "layer_index", "engine", "seed", "perplexity", "k", "n",
    "success_rate", "variant", "space", "value", "calibrated", "map_calibrated",
    "reduced_calibrated", "overlap", "mixing", "pair", "share", "overlap_reduced", "share_reduced",
    "artefact_flag", "auc", "ci_low", "ci_high", "calibrated_ci_low", "calibrated_ci_high", "seconds_reduce", "seconds_embed", "seconds_overlap", "error",
)  # fmt: skip
METRICS = ("overlap", "mixing", "pair", "share", "overlap_reduced", "share_reduced", "auc",
           "calibrated", "map_calibrated", "reduced_calibrated",
           "overlap_reduced_calibrated")  # fmt: skip
GROUP_KEYS = ("attack", "norm", "layer")
REPEAT_KEYS = ("engine", "seed", "perplexity")
PLURAL = {"engine": "engines", "seed": "seeds", "perplexity": "perplexities"}
N_BOOT = 2000
MIN_PERCENTILE_REPEATS = 10  # fewer repeats: a percentile interval would be [min, max] in disguise


# ---------------------------------------------------------------- JSON/CSV I/O
def _plain(v: Any) -> Any:
    """A JSON-safe value: numpy scalars to Python, NaN to None, paths and objects to str."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_plain(x) for x in v]
    return str(v)


def _sort_key(row: dict) -> tuple:
    def s(v: Any) -> tuple:  # None last, numbers before strings
        return (v is None, isinstance(v, str), v if v is not None else 0)

    return tuple(s(row.get(k)) for k in ("attack", "norm", "layer_index", *REPEAT_KEYS))


def clean_rows(rows: Iterable[dict]) -> list[dict]:
    """JSON-safe copies of ``rows`` in table order, every :data:`ROW_KEYS` key present."""
    out = []
    for row in rows:
        r = {k: _plain(row.get(k)) for k in ROW_KEYS}
        r.update({k: _plain(v) for k, v in row.items() if k not in r})
        out.append(r)
    return sorted(out, key=_sort_key)


def write_csv(path: Path, rows: Sequence[dict], keys: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to CSV with ``keys`` first, then any extra scalar keys; None -> empty."""
    keys = list(keys or [])
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, dict | list)]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row.get(k) for k in keys})
    return atomic_write(path, buf.getvalue().encode())


def write_metrics(
    run_dir: str | Path, rows: Sequence[dict], layers: Sequence[str]
) -> dict[str, Path]:
    """Write ``metrics.json`` (rows, aggregate, layers), ``metrics.csv`` and, when repeats
    exist, ``metrics_aggregate.csv``. Returns the written paths by name."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = clean_rows(rows)
    agg = aggregate(rows, layers)
    doc = {"layers": list(layers), "rows": rows, "aggregate": agg}
    out = {"metrics.json": run_dir / "metrics.json", "metrics.csv": run_dir / "metrics.csv"}
    atomic_write(out["metrics.json"], json.dumps(doc, indent=1, allow_nan=False).encode())
    write_csv(out["metrics.csv"], rows, ROW_KEYS)
    if any(a["n_repeats"] > 1 for a in agg):
        out["metrics_aggregate.csv"] = write_csv(run_dir / "metrics_aggregate.csv", agg)
    return out


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The rows and the layer order of a run folder (``metrics.json``)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise StoreError(
            f"{str(path)!r} does not exist: is {str(run_dir)!r} a finished run folder? "
            "Run `advlens run` first, or pass the folder holding metrics.json."
        )
    redo = "rerun `advlens run` with the run's settings: it rebuilds it from tasks/"
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); {redo}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    layers = doc.get("layers") if isinstance(doc, dict) else None
    bad = (
        "no list of rows"
        if not isinstance(rows, list)
        else next(
            (
                f"row {i} is not a metrics row"
                for i, r in enumerate(rows)
                if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in GROUP_KEYS)
            ),
            None,
        )
    )
    if bad is None and not (layers is None or isinstance(layers, list)):
        bad = "'layers' is not a list"
    if bad or not isinstance(rows, list):
        raise StoreError(f"{path} is damaged ({bad}); {redo}")
    return rows, list(layers or layer_order(rows))


def read_provenance(run_dir: str | Path) -> dict:
    """``provenance.json`` of a run; {} with a warning naming the file when missing or damaged."""
    path = Path(run_dir) / "provenance.json"
    try:
        prov = json.loads(path.read_text())
        if not isinstance(prov, dict):
            raise ValueError(f"a JSON {type(prov).__name__}, not an object")
        return prov
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning(
            "%s is missing or damaged (%s): the report goes without provenance; rerun "
            "`advlens run` with the run's settings to write it again", path, exc,
        )  # fmt: skip
        return {}


def own_figures(run_dir: str | Path, pattern: str) -> list[Path]:
    """``figures/<pattern>`` files advlens wrote (all matches in a run without a record), so
    that a user's PNG named like an advlens figure never reaches the report."""

    run_dir = Path(run_dir)
    found = sorted((run_dir / "figures").glob(pattern))
    if not (run_dir / WRITTEN).is_file():
        return found
    ours = written(run_dir)
    return [p for p in found if f"figures/{p.name}" in ours]


def layer_order(rows: Iterable[dict]) -> list[str]:
    """Layers sorted by ``layer_index`` (first seen wins)."""
    seen: dict[str, float] = {}
    for r in rows:
        if r.get("layer") is not None and r["layer"] not in seen:
            index = r.get("layer_index")
            seen[r["layer"]] = float(index) if index is not None else 1e9
    return sorted(seen, key=lambda name: seen[name])


# ---------------------------------------------------------------- aggregation
def bootstrap_mean(
    values: np.ndarray, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        v = float(values[0]) if values.size else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval_kind(n_repeats: int) -> str:
    """How :func:`aggregate` states the spread over ``n_repeats`` repeats."""
    if n_repeats >= MIN_PERCENTILE_REPEATS:
        return f"95% percentile bootstrap over {n_repeats} repeats"
    return f"{n_repeats} repeat{'s' if n_repeats != 1 else ''}, range"


def _stats(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "boot_low": None, "boot_high": None}
    if v.size >= MIN_PERCENTILE_REPEATS:
        lo, hi = bootstrap_mean(v)
    else:
        lo, hi = float(v.min()), float(v.max())
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "boot_low": lo, "boot_high": hi}


def ok_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows of tasks that succeeded (no error, an overlap value)."""
    return [r for r in rows if not r.get("error") and r.get("overlap") is not None]


def aggregate(rows: Iterable[dict], layers: Sequence[str] | None = None) -> list[dict]:
    """One row per (attack, norm, layer) over the repeats (engines, seeds, perplexities).

    Each metric m in :data:`METRICS` gets ``m_mean``, ``m_std`` (ddof=1; 0 for one repeat),
    ``m_boot_low`` and ``m_boot_high``: the 95% percentile bootstrap of the mean over repeats
    with at least :data:`MIN_PERCENTILE_REPEATS`, else their range (``interval`` says which).
    ``pooled`` names the repeat keys other than the seed with several values (engines,
    perplexities): those are pooled only visibly. ``artefact_flag`` compares the mean
    calibrated value of the reported statistic on the map with that on the reduced points.
    """
    rows = ok_rows(rows)
    order = {name: i for i, name in enumerate(layers or layer_order(rows))}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    out = []
    for (attack, norm, layer), rs in groups.items():
        first = rs[0]
        a: dict[str, Any] = {
            "attack": attack,
            "norm": norm,
            "eps": first.get("eps"),
            "layer": layer,
            "layer_index": order.get(layer, first.get("layer_index")),
            "k": first.get("k"),
            "n": first.get("n"),
            "success_rate": first.get("success_rate"),
            "n_repeats": len(rs),
            # one map: its own bootstrap interval over points (from the overlap stage)
            "ci_low": first.get("ci_low") if len(rs) == 1 else None,
            "ci_high": first.get("ci_high") if len(rs) == 1 else None,
            "calibrated_ci_low": first.get("calibrated_ci_low") if len(rs) == 1 else None,
            "calibrated_ci_high": first.get("calibrated_ci_high") if len(rs) == 1 else None,
            "variant": first.get("variant", "overlap"),
            "space": first.get("space", "map"),
        }
        for key in REPEAT_KEYS:
            a[PLURAL[key]] = " ".join(sorted({str(r.get(key)) for r in rs}))
        a["interval"] = interval_kind(len(rs))
        a["pooled"] = " ".join(
            PLURAL[key] for key in ("engine", "perplexity") if len({r.get(key) for r in rs}) > 1
        )
        for m in METRICS:
            for stat, v in _stats([r.get(m) for r in rs]).items():
                a[f"{m}_{stat}"] = v
        # the reported statistic on the map against on the reduced points
        om, rm = a["map_calibrated_mean"], a["reduced_calibrated_mean"]
        if om is None or rm is None:  # rows written before the space setting: overlap
            om, rm = a["calibrated_mean"], a["overlap_reduced_calibrated_mean"]
        if om is None or rm is None:  # rows written before calibration: raw values
            om, rm = a["overlap_mean"], a["overlap_reduced_mean"]
        a["artefact_flag"] = bool(om is not None and rm is not None and abs(om - rm) > ARTEFACT_GAP)
        out.append(a)
    return sorted(out, key=_sort_key)


# ---------------------------------------------------------------- per-task maps
def load_maps(run_dir: str | Path, rows: Iterable[dict]) -> dict[tuple[str, str], list[TaskMap]]:
    """The primary repeat's map of every layer, per (attack, norm), in layer order.

    The primary repeat is the first engine, seed and perplexity in table order whose map
    ``tasks/<task_id>.npz`` reads back intact. A damaged or missing map is left out with a
    warning naming its file and what to run.
    """
    run_dir = Path(run_dir)
    tasks = run_dir / "tasks"
    out: dict[tuple[str, str], list[TaskMap]] = {}
    seen: set[tuple] = set()
    for r in clean_rows(ok_rows(rows)):
        group = tuple(str(r.get(k)) for k in GROUP_KEYS)
        if group in seen:
            continue
        try:
            if not r.get("task_id"):
                raise StoreError(f"the row of layer {r.get('layer')!r} names no task")
            m = read_task_map(tasks / f"{r['task_id']}.npz", r)
        except StoreError as exc:
            log.warning(
                "%s: the report shows no map for %s %s %s; rerun `advlens run` with the "
                "settings of %s to recompute it", exc, r.get("attack"), r.get("norm"),
                r.get("layer"), run_dir,
            )  # fmt: skip
            continue  # the next repeat of the layer, if any, stands in
        seen.add(group)
        out.setdefault((r["attack"], r["norm"]), []).append(m)
    return out


def knn_overlap_sweep(xy: np.ndarray, is_perturbed: np.ndarray, ks: Sequence[int]) -> dict:
    """``overlap`` at each k, from one kNN pass (:func:`advlens.overlap.overlap_sweep`)."""

    ks = [k for k in ks if 0 < k < len(xy)]
    if not ks:
        return {}
    res = overlap_sweep(xy, is_perturbed, ks=tuple(ks), variants=("overlap",))
    return {k: float(res[("overlap", k)].value) for k in ks}


def row_sweep(m: TaskMap, ks: Sequence[int]) -> dict:
    """The k-sweep a layer task already stored in its row; recomputed only when it lacks a k."""
    stored = m.row.get("k_sweep") or {}
    ks = [k for k in ks if 0 < k < len(m.xy)]
    if all(f"overlap@{k}" in stored for k in ks):
        return {k: float(stored[f"overlap@{k}"]) for k in ks}
    return knn_overlap_sweep(m.xy, m.is_perturbed, ks)


def per_class_overlap(m: TaskMap) -> dict[int, float]:
    """Share of overlapping points (clean and perturbed) per true class."""
    return {int(c): float(m.per_point[m.labels == c].mean()) for c in np.unique(m.labels)}
