"""The same config gives bit-identical rows in process and on local Dask workers."""

from __future__ import annotations

import json

import pytest

from advlens.cli import main as cli

TINY = [
    "data.source=synthetic", "data.n=40", "attack.n_iter=5", "attack.batch_size=20",
    "attack.norms=['linf']", "embed.n_iter=300", "embed.pca_dims=10", "overlap.bootstrap=20",
]  # fmt: skip
# Fields that record where and how long a task ran (the task id names the run folder).
RUN_FIELDS = {"seconds_reduce", "seconds_embed", "seconds_overlap", "engine_seconds",
              "seconds_task", "worker", "task_id", "memory_budget"}  # fmt: skip


def _rows(run_dir):
    rows = json.loads((run_dir / "metrics.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return [{k: v for k, v in r.items() if k not in RUN_FIELDS} for r in rows]


@pytest.mark.slow
def test_in_process_and_two_workers_give_identical_rows(tmp_path):
    sets = sum((["--set", s] for s in [*TINY, f"output.root='{tmp_path}'"]), [])
    assert cli(["run", "--quiet", *sets, "--set", "output.name='a'"]) == 0
    assert cli(["run", "--quiet", *sets, "--set", "output.name='b'", "--workers", "2"]) == 0
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(a) >= 6 and [r["layer"] for r in a] == [r["layer"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb, ra["layer"]
