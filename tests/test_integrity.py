"""Damaged runs, on tiny real runs: every damage is refused with a message, or recomputed to
the numbers of an undamaged run; exit codes; advlens deletes only the files it wrote.

One real run (synthetic data, the small CNN, the real attack, openTSNE) is made once; each test
restores it to the same path (task ids name the store's path), damages it and reruns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from advlens.cli import main as cli

TINY = [
    "data.source=synthetic", "data.n=24", "attack.n_iter=3", "attack.batch_size=8",
    "attack.norms=['linf']", "layers.select=['conv1', 'fc1']", "layers.include_input=false",
    "embed.n_iter=250", "embed.n_jobs=1", "embed.pca_dims=8", "overlap.bootstrap=10",
]  # fmt: skip
# Columns that depend on how long things took, not on the data.
TIMES = ("seconds_reduce", "seconds_embed", "seconds_overlap", "engine_seconds", "seconds_task")


def _args(root: Path, *extra: str) -> list[str]:
    sets = [*TINY, f"output.root='{root}'", "output.name='run'", *extra]
    return sum((["--set", s] for s in sets), [])


def _numbers(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in TIMES and k != "worker"} for r in rows]


class Run:
    """The reference run: ``restore()`` puts it back, intact, at ``path``."""

    def __init__(self, base: Path) -> None:
        self.root, self.path, self.pristine = base / "out", base / "out" / "run", base / "ref"
        assert cli(["run", "--quiet", *_args(self.root)]) == 0
        shutil.copytree(self.path, self.pristine)
        self.numbers = _numbers(self.path)

    def restore(self) -> Path:
        shutil.rmtree(self.path)
        shutil.copytree(self.pristine, self.path)
        return self.path

    def rerun(self, *extra: str) -> int:
        return cli(["run", "--quiet", *_args(self.root), *extra])

    def tasks(self, suffix: str) -> list[Path]:
        return sorted((self.path / "tasks").glob(f"*{suffix}"))


def first_in_loop(*values: str) -> list:
    """Damage cases of one code path: the first runs in ``make test``, the rest (each a rerun of
    advlens, seconds) in the ``long`` tier that CI runs."""
    return [values[0], *(pytest.param(v, marks=pytest.mark.long) for v in values[1:])]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("integrity"))


def _cut(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "deleted":
        path.unlink()
    else:
        path.write_bytes(raw[: {"empty": 0, "one byte": 1, "half": len(raw) // 2}[how]])


def test_reference_run_verifies_clean(ref, capsys):
    ref.restore()
    assert len(ref.numbers) == 2 and all(r["error"] is None for r in ref.numbers)
    assert cli(["verify", str(ref.path)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out and "2 task rows, 2 maps intact" in out


@pytest.mark.parametrize("how", first_in_loop("half", "empty", "one byte", "deleted"))
def test_damaged_shard_is_named_then_recomputed_to_the_same_numbers(ref, capsys, caplog, how):
    run = ref.restore()
    shard = run / "apgd-ce-linf.zarr/layers/fc1/perturbed/c/1/0"
    raw = shard.read_bytes()
    _cut(shard, how)
    capsys.readouterr()
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "layers/fc1/perturbed/c/1/0" in out and "advlens run" in out
    for row in ref.tasks("--fc1--opentsne-s0-p30-*.json"):  # so fc1 is read from the store
        row.unlink()
    caplog.clear()
    assert ref.rerun() == 0
    assert "batch 1 (rows 8:16) is damaged" in caplog.text and "c/1/0" in caplog.text
    assert shard.read_bytes() == raw  # the batch was attacked and written again, identically
    assert _numbers(run) == ref.numbers
    assert cli(["verify", str(run)]) == 0


def test_damaged_samples_chunk_and_lost_manifest_are_recomputed(ref, capsys):
    run = ref.restore()
    (run / "apgd-ce-linf.zarr/samples/success/c/2").write_bytes(b"")
    (run / "apgd-ce-linf.zarr/progress/batches/manifest/0.json").unlink()
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "samples/success/c/2 has 0 bytes" in out and "manifest/0.json is missing" in out
    for row in ref.tasks(".json"):
        row.unlink()
    assert ref.rerun() == 0
    assert _numbers(run) == ref.numbers


@pytest.mark.parametrize("damage", first_in_loop("half", "empty", "not json", "{}", "other task"))
def test_damaged_row_is_named_and_recomputed(ref, capsys, caplog, damage):
    run = ref.restore()
    row = ref.tasks(".json")[0]
    text = row.read_text()
    row.write_text(
        {
            "empty": "",
            "not json": "not json",
            "{}": "{}",
            "half": text[: len(text) // 2],
            "other task": ref.tasks(".json")[1].read_text(),
        }[damage]
    )
    capsys.readouterr()
    assert cli(["verify", str(run)]) == 1
    assert f"task row {row} is damaged" in capsys.readouterr().out
    caplog.clear()
    assert ref.rerun() == 0
    assert f"task row {row} is damaged" in caplog.text and "recomputing" in caplog.text
    assert row.read_text() != "" and _numbers(run) == ref.numbers


@pytest.mark.parametrize("damage", first_in_loop("half", "empty", "deleted", "wrong shape"))
def test_damaged_map_is_named_by_report_and_recomputed_by_run(ref, capsys, caplog, damage):
    import numpy as np

    run = ref.restore()
    npz = ref.tasks(".npz")[-1]
    if damage == "wrong shape":
        with np.load(npz) as z:
            arrays = dict(z)
        np.savez(npz, **{**arrays, "xy": arrays["xy"][:-2]})
    else:
        _cut(npz, damage)
    capsys.readouterr()
    caplog.clear()
    assert cli(["report", "--quiet", str(run)]) == 0  # the report goes on without that map
    assert f"task map {npz} is" in caplog.text and "advlens run" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    assert (run / "report.html").is_file()
    assert cli(["verify", str(run)]) == 1
    assert str(npz) in capsys.readouterr().out
    caplog.clear()
    assert ref.rerun() == 0
    assert f"task map {npz} is" in caplog.text
    with np.load(npz) as z, np.load(ref.pristine / "tasks" / npz.name) as want:
        assert all(np.array_equal(z[k], want[k]) for k in want.files)
    assert _numbers(run) == ref.numbers


def test_damaged_provenance_and_metrics(ref, capsys, caplog):
    run = ref.restore()
    (run / "provenance.json").write_text('{"config": ')
    capsys.readouterr()
    assert cli(["report", "--quiet", str(run)]) == 0
    assert "provenance.json is missing or damaged" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    assert cli(["verify", str(run)]) == 1
    assert "provenance.json" in capsys.readouterr().out
    for text in ("", "[1, 2]", '{"rows": [{}]}', '{"rows": 3}'):
        (run / "metrics.json").write_text(text)
        assert cli(["report", "--quiet", str(run)]) == 2
        err = capsys.readouterr().err
        assert "metrics.json" in err and "advlens run" in err and "Traceback" not in err
    assert ref.rerun() == 0  # the rows are in tasks/: the run writes both files again
    assert _numbers(run) == ref.numbers
    assert cli(["verify", str(run)]) == 0


def test_a_failed_task_gives_exit_1_and_is_named(ref, capsys):
    run = ref.restore()
    npz = ref.tasks(".npz")[0]
    npz.unlink()
    npz.mkdir()  # the task cannot write its map: a real failure, not a mock
    capsys.readouterr()
    assert ref.rerun() == 1
    out = capsys.readouterr().out
    assert "1 of 2 task(s) failed" in out and npz.stem in out
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert [r["error"] is None for r in rows].count(False) == 1  # the table is still written
    npz.rmdir()
    assert ref.rerun() == 0 and _numbers(run) == ref.numbers


def test_user_files_survive_overwrite_and_report(ref, capsys, caplog):
    run = ref.restore()
    mine = [run / "notes.txt", run / "tasks" / "mine.json", run / "tasks" / "mine.npz"]
    mine += [
        run / "figures" / n for n in ("maps-mine.png", "layer_curve_v2.png", "k_sweep.png.bak")
    ]
    for p in mine:
        p.write_bytes(b"user data")
    ours = ref.tasks(".json") + ref.tasks(".npz")
    # Bad settings, or data that cannot serve them: refused before anything is deleted.
    assert ref.rerun("--overwrite", "--set", "attack.norms=['l3']") == 2
    assert ref.rerun("--overwrite", "--set", "data.n=100000") == 2
    assert all(p.is_file() for p in ours + mine)
    capsys.readouterr()
    assert cli(["report", "--quiet", str(run)]) == 0
    assert all(p.read_bytes() == b"user data" for p in mine)
    caplog.clear()
    assert ref.rerun("--overwrite", "--set", "attack.n_iter=2") == 0
    assert "removed 4 task file(s)" in caplog.text
    assert "tasks/mine.json" in caplog.text and "tasks/mine.npz" in caplog.text
    assert all(p.read_bytes() == b"user data" for p in mine)
    # The rows are those of the new settings, not the earlier run's.
    store = json.loads((run / "provenance.json").read_text())["config"]["attack"]["n_iter"]
    assert store == 2 and all(p.is_file() for p in ours)
    assert cli(["verify", str(run)]) == 1  # mine.json is no task row: named
    assert "tasks/mine.json" in capsys.readouterr().out


def test_overwrite_of_a_run_without_a_record_removes_only_its_task_files(ref, caplog):
    run = ref.restore()
    (run / ".advlens-written").unlink()  # as an advlens that kept no record left it
    mine = run / "tasks" / "mine.json"
    mine.write_text('{"task_id": "mine"}')
    caplog.clear()
    assert ref.rerun("--overwrite", "--set", "attack.n_iter=2") == 0
    assert "removed 4 task file(s)" in caplog.text and "tasks/mine.json" in caplog.text
    assert mine.read_text() == '{"task_id": "mine"}'


def test_a_stale_figure_advlens_wrote_is_removed(ref):
    run = ref.restore()
    old = run / "figures" / "maps-pgd-l2.png"  # as if an earlier pass had an l2 attack
    shutil.copy(run / "figures" / "maps-apgd-ce-linf.png", old)
    with open(run / ".advlens-written", "a") as fh:
        fh.write("figures/maps-pgd-l2.png\n")
    assert cli(["report", "--quiet", str(run)]) == 0
    assert not old.exists() and (run / "figures" / "maps-apgd-ce-linf.png").is_file()
    assert "figures/maps-pgd-l2.png" not in (run / ".advlens-written").read_text()


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("output.name='../../x'", "output.name = '../../x'"),
        ("output.name='/abs'", "output.name = '/abs'"),
        ("output.name=''", "output.name = ''"),
    ],
)
def test_output_outside_root_is_refused(tmp_path, capsys, setting, needle):
    assert cli(["run", "--quiet", "--set", f"output.root='{tmp_path}'", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_output_root_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for root in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert cli(["run", "--quiet", "--set", f"output.root='{root}'"]) == 2
        err = capsys.readouterr().err
        assert f"'{tmp_path / 'f'}' is a file" in err and "Traceback" not in err


def test_verify_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli(["verify", str(tmp_path)]) == 2
    assert cli(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "holds no advlens run" in err and "is not a folder" in err
