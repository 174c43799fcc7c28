"""Check a finished run folder: its stores, task rows and maps, metrics and provenance.

Every store's batches are compared with their manifests (sizes and CRC-32 checksums), every
``tasks/<id>.json`` row is checked against the row schema and its ``.npz`` map against the
row, and ``metrics.json`` and ``provenance.json`` must parse. Each problem is printed with the
file it concerns and what to run; nothing is changed.

Exit status: 0 when everything is intact, 1 when something is damaged, 2 when RUN_DIR is not a
run folder.

Examples:
  advlens verify runs/default
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advlens.errors import StoreError
from advlens.report.tables import read_metrics, read_task_map, read_task_row
from advlens.store import ActivationStore

RERUN = "rerun `advlens run` with the run's settings"


def verify(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """(problems, checked): one line per damaged thing, naming its file and what to run, and
    one line per kind of thing that was checked."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"{run_dir} is not a folder: pass a run folder, e.g. runs/default")
    problems: list[str] = []
    checked: list[str] = []
    stores = sorted(p for p in run_dir.glob("*.zarr") if p.is_dir())
    rows = sorted((run_dir / "tasks").glob("*.json")) if (run_dir / "tasks").is_dir() else []
    if not (stores or rows or (run_dir / "metrics.json").exists()):
        raise StoreError(f"{run_dir} holds no advlens run (no *.zarr store, tasks/ or metrics)")
    for path in stores:
        try:
            store = ActivationStore.open(path)
            done = store.completed_batches()
            found = store.check()
        except StoreError as exc:
            problems.append(f"{exc}")
            continue
        if not done.all():
            problems.append(
                f"{path}: {int(done.sum())} of {store.n_batches} batches written; "
                f"{RERUN} to finish it"
            )
        problems += [
            f"{path}: {p}: {RERUN}, which writes that batch again, or pass --overwrite"
            for p in found
        ]
        checked.append(f"store {path.name}: {int(done.sum())} batches, checksums compared")
    n_maps = 0
    for js in rows:
        try:
            row = read_task_row(js)
            read_task_map(js.with_suffix(".npz"), row)
            n_maps += 1
        except StoreError as exc:
            problems.append(f"{exc}: {RERUN}, which recomputes that task")
    checked.append(f"{len(rows)} task rows, {n_maps} maps intact")
    for name, read in (("metrics.json", read_metrics), ("provenance.json", _provenance)):
        try:
            read(run_dir)
            checked.append(name)
        except (StoreError, OSError, ValueError) as exc:
            problems.append(f"{run_dir / name}: {exc}: {RERUN} to write it again")
    return problems, checked


def _provenance(run_dir: Path) -> dict:
    prov = json.loads((run_dir / "provenance.json").read_text())
    if not isinstance(prov, dict):
        raise ValueError("not a JSON object")
    return prov


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/default")


def main(args: argparse.Namespace) -> int:
    problems, checked = verify(args.run_dir)
    for line in problems:
        print(f"damaged: {line}")
    print(f"checked {args.run_dir}: " + "; ".join(checked))
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("intact")
    return 0
