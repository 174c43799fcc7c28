"""A layer task's results on disk: its row (``tasks/<id>.json``) and its map
(``tasks/<id>.npz``), the schema they must meet and the artefact threshold.

Compute side: :mod:`advlens.layer_task` writes and re-reads these files; the report
(:mod:`advlens.report.tables`) reads them too, from here (docs/design.md, "Module map").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advlens.errors import StoreError

# A finished task's row: key -> accepted types (None where a value may be missing).
ROW_SCHEMA: dict[str, tuple[type, ...]] = {
    "task_id": (str,), "attack": (str,), "norm": (str,), "layer": (str,), "engine": (str,),
    "layer_index": (int,), "seed": (int,), "k": (int,), "n": (int,),
    "eps": (int, float), "perplexity": (int, float),
    "success_rate": (int, float), "overlap": (int, float), "mixing": (int, float),
    "pair": (int, float), "value": (int, float),
    "overlap_reduced": (int, float, type(None)), "auc": (int, float, type(None)),
    "ci_low": (int, float, type(None)), "ci_high": (int, float, type(None)),
    "k_sweep": (dict,), "per_class": (dict,),
}  # fmt: skip
UNIT_KEYS = ("success_rate", "overlap", "mixing", "pair", "value", "overlap_reduced", "auc")
# The artefact check: |reported statistic, calibrated, on the map - on the reduced points| above
# this flags the map (it measures how far t-SNE's local mixing departs from the points it
# embeds). Measured for share on the default model (benchmarks/metric_vs_n.py, every layer below
# the input, N = 250..2,000, 3 subset draws): where map and 50-D agree (fc1,
# logits) the gap's mean is within 0.016 and its sd 0.026, |gap| <= 0.068 at every N; 0.1 sits
# above that noise floor. From the input to pool2 the map is more mixed than the points it
# embeds by 0.17 to 0.42 (t-SNE merges twins that the 50-D points keep apart): flagged.
ARTEFACT_GAP = 0.1


@dataclass(frozen=True)
class TaskMap:
    """One layer task's 2-D map (``tasks/<id>.npz``) and its metrics row."""

    row: dict
    xy: np.ndarray
    is_perturbed: np.ndarray
    labels: np.ndarray
    per_point: np.ndarray

    def __post_init__(self) -> None:
        n = self.xy.shape[0]
        if self.xy.shape != (n, 2) or any(
            a.shape != (n,) for a in (self.is_perturbed, self.labels, self.per_point)
        ):
            raise StoreError(f"task map for layer {self.row.get('layer')!r}: inconsistent shapes")
        rows = self.row.get("n")
        if isinstance(rows, int) and (n != 2 * rows or int(self.is_perturbed.sum()) != rows):
            raise StoreError(
                f"task map for layer {self.row.get('layer')!r} holds {n} points, its row says "
                f"{rows} clean + {rows} perturbed"
            )
        if not np.isfinite(self.xy).all():
            raise StoreError(f"task map for layer {self.row.get('layer')!r}: non-finite points")


def check_row(row: Any) -> None:
    """Raise ``ValueError`` saying what is wrong when ``row`` is not a finished task's row."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if row.get("error") is not None:
        raise ValueError(f"it records a failed task ({str(row['error'])[:80]})")
    missing = [k for k in ROW_SCHEMA if k not in row]
    if missing:
        raise ValueError(f"keys {missing} are missing")
    for key, types in ROW_SCHEMA.items():
        v = row[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise ValueError(f"{key} = {v!r} is not of type {'/'.join(t.__name__ for t in types)}")
    for key in UNIT_KEYS:
        v = row[key]
        if v is not None and not 0.0 <= v <= 1.0:  # NaN fails too
            raise ValueError(f"{key} = {v!r} lies outside [0, 1]")
    if row["n"] < 1:
        raise ValueError(f"n = {row['n']!r} must be >= 1")


def read_task_row(path: str | Path) -> dict:
    """A task's row (``tasks/<id>.json``), checked; :class:`StoreError` names a damaged file."""
    path = Path(path)
    try:
        row = json.loads(path.read_text())
        check_row(row)
        if row["task_id"] != path.stem:
            raise ValueError(f"it belongs to task {row['task_id']!r}")
    except FileNotFoundError:
        raise StoreError(f"task row {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"task row {path} is damaged: {exc}") from None
    return row


def read_task_map(path: str | Path, row: dict) -> TaskMap:
    """The map (``tasks/<id>.npz``) of ``row``, checked; :class:`StoreError` names a damaged
    or missing file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, np.load(fh) as z:  # our handle: closed when np.load fails
            return TaskMap(
                row,
                np.asarray(z["xy"], dtype=float),
                np.asarray(z["is_perturbed"], dtype=bool),
                np.asarray(z["labels"]),
                np.asarray(z["per_point"], dtype=float),
            )
    except FileNotFoundError:
        raise StoreError(f"task map {path} is missing") from None
    except Exception as exc:  # truncated zip, missing member, wrong shapes, ...
        raise StoreError(f"task map {path} is damaged ({type(exc).__name__}: {exc})") from None
