"""Scheduling layer tasks: in process, on local Dask workers and on a separately started cluster.

The cluster tests start real scheduler and worker processes on localhost. Their reference is
the same tasks run in the calling process (workers=0).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA

from advlens import schedule
from advlens.errors import ConfigError
from advlens.schedule import ClusterPlan, describe_cluster, list_gpus, plan_cluster, run_tasks

# Worker and scheduler processes cannot import this test module: ship its functions by value.
# (Dask pickles module-level functions by reference; a closure makes it use cloudpickle, which
# then pickles this registered module's functions by value.)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def shipped(fn):
    def call(task):
        return fn(task)

    return call


TIMING = ("seconds_task", "worker")


def layer_like(task: dict) -> dict:
    """A deterministic stand-in for a layer task: PCA of a joint clean/perturbed matrix, then
    the kNN overlap of the two sets (same shape of work as reduce -> overlap).

    Optional keys: ``marker_dir`` (write ``<task_id>.<pid>.<uuid>`` on every attempt),
    ``hold`` (seconds to sleep after starting), ``fail_first`` (attempts that raise).
    """
    marker_dir = task.get("marker_dir")
    if marker_dir:
        name = f"{task['task_id']}.{os.getpid()}.{uuid.uuid4().hex}"
        Path(marker_dir, name).touch()
        attempts = len(list(Path(marker_dir).glob(f"{task['task_id']}.*")))
        if attempts <= task.get("fail_first", 0):
            raise RuntimeError(f"planned failure {attempts} of {task['task_id']}")
    time.sleep(task.get("hold", 0.0))
    rng = np.random.default_rng(task["seed"])
    n, d, k = 60, 40, 5
    clean = rng.normal(size=(n, d))
    perturbed = clean + task["shift"] * rng.normal(size=(n, d)) + task["shift"]
    x = np.vstack([clean, perturbed])
    pca = PCA(n_components=8, svd_solver="full").fit(x)
    z = pca.transform(x)
    _, idx = cKDTree(z).query(z, k=k + 1)
    is_perturbed = np.repeat([False, True], n)
    mixed = (is_perturbed[idx[:, 1:]] != is_perturbed[:, None]).any(axis=1)
    return {
        "layer": task["layer"],
        "overlap": float(mixed.mean()),
        "explained": float(pca.explained_variance_ratio_.sum()),
    }


def make_tasks(n: int, **extra) -> list[dict]:
    return [
        {"task_id": f"l{i}", "layer": f"block{i}", "seed": i, "shift": 0.5 * i, **extra}
        for i in range(n)
    ]


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_results(rows: list[dict], reference: list[dict]) -> None:
    assert [r["layer"] for r in rows] == [r["layer"] for r in reference]
    for got, want in zip(strip(rows), strip(reference), strict=True):
        assert got["overlap"] == want["overlap"]  # a count ratio: exact
        assert got["explained"] == pytest.approx(want["explained"], rel=1e-9)
        assert got["error"] is None and want["error"] is None


def worker_children() -> list:
    """Dask worker processes still running below this one (none must survive a test)."""
    import psutil

    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "spawn_main" in cmd and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(cmd)
        except psutil.NoSuchProcess:
            pass
    return alive


# --------------------------------------------------------------------------- in process


def test_in_process_rows_follow_task_order_with_timings():
    tasks = make_tasks(4)
    rows = run_tasks(layer_like, tasks, progress=False)
    assert strip(rows) == [layer_like(t) | {"error": None} for t in tasks]
    assert all(r["worker"] == "local" and r["seconds_task"] >= 0 for r in rows)
    # Larger shifts separate the sets: overlap falls from mixed to separated.
    assert rows[0]["overlap"] > 0.9 and rows[-1]["overlap"] < 0.2


def test_progress_reports_rate_and_quiet_gives_log_lines_only(capsys, caplog):
    # Off a terminal (as here) progress comes as log lines with the rate and time left.
    with caplog.at_level(logging.INFO, logger="advlens.progress"):
        run_tasks(layer_like, make_tasks(3), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "advlens.progress"]
    assert any("3/3 task" in line and "task/s" in line and "left" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="advlens.progress"):
        run_tasks(layer_like, make_tasks(3), progress=False)
    assert "\r" not in capsys.readouterr().err  # never a bar with progress=False (--quiet)
    assert any("3/3 task" in r.getMessage() for r in caplog.records)


@settings(max_examples=25, deadline=None)
@given(
    failures=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    retries=st.integers(0, 2),
)
def test_in_process_retries_then_reports(failures, retries):
    """Task i raises on its first failures[i] attempts: it succeeds iff failures[i] <= retries."""
    calls: dict[str, int] = {}

    def flaky(task):
        calls[task["task_id"]] = calls.get(task["task_id"], 0) + 1
        if calls[task["task_id"]] <= task["fail"]:
            raise ValueError(f"attempt {calls[task['task_id']]} of {task['task_id']}")
        return {"value": task["fail"] * 10}

    tasks = [{"task_id": f"t{i}", "layer": f"L{i}", "fail": f} for i, f in enumerate(failures)]
    rows = run_tasks(flaky, tasks, retries=retries, progress=False)
    assert len(rows) == len(tasks)
    for task, row in zip(tasks, rows, strict=True):
        assert calls[task["task_id"]] == min(task["fail"], retries) + 1
        if task["fail"] <= retries:
            assert row["value"] == task["fail"] * 10 and row["error"] is None
        else:
            assert row["error"] == f"ValueError: attempt {retries + 1} of {task['task_id']}"
            assert row["task_id"] == task["task_id"] and row["layer"] == task["layer"]
            assert "value" not in row and row["seconds_task"] is None


def test_error_row_uses_the_task_identity():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Task:
        layer: str
        seed: int
        path: Path
        cfg: tuple = (1, 2)  # not a scalar: left out of the row

        @property
        def task_id(self):
            return f"{self.layer}-s{self.seed}"

    def boom(task):
        raise KeyError(task.layer)

    (row,) = run_tasks(boom, [Task("conv1", 3, Path("/tmp/x"))], retries=0, progress=False)
    assert row == {
        "layer": "conv1",
        "seed": 3,
        "path": "/tmp/x",
        "task_id": "conv1-s3",
        "error": "KeyError: 'conv1'",
        "seconds_task": None,
        "worker": None,
    }


# --------------------------------------------------------------------------- cluster choice


def test_plan_and_options():
    assert plan_cluster().kind == "in-process"
    assert plan_cluster(scheduler="head:8786") == ClusterPlan(
        "scheduler", address="tcp://head:8786"
    )
    assert "tcp://head:8786" in describe_cluster(scheduler="head:8786")
    with pytest.raises(ConfigError, match="schedule.workers = -1"):
        run_tasks(layer_like, make_tasks(1), workers=-1)
    with pytest.raises(ConfigError, match="schedule.retries"):
        run_tasks(layer_like, make_tasks(1), retries=-1)
    assert run_tasks(layer_like, [], workers=2) == []  # nothing to do: no cluster started
    with pytest.raises(ConfigError, match="GPU 99 does not exist"):
        list_gpus((99,))


def test_plan_without_gpu():
    if list_gpus():
        pytest.skip("this machine has a GPU")
    assert plan_cluster(workers=3) == ClusterPlan("local-cpu", 3)
    assert "3 single-threaded CPU worker" in describe_cluster(workers=3)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        plan_cluster(gpus=(0,))


def test_worker_gpu_is_the_first_visible_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,0,1")  # dask-cuda's list for worker 2
    assert schedule.worker_gpu() == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # our own cluster: one device
    assert schedule.worker_gpu() == "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert schedule.worker_gpu() is None


def test_driver_device_follows_the_chosen_gpus():
    assert schedule.driver_device("cuda", (1,)) == "cuda:1"  # --gpus 1: off GPU 0
    assert schedule.driver_device("cuda", (2, 0)) == "cuda:2"
    assert schedule.driver_device("cuda", ()) == "cuda"
    assert schedule.driver_device("cuda:3", (1,)) == "cuda:3"  # an explicit device is kept
    assert schedule.driver_device("cpu", (1,)) == "cpu"


def test_release_device_keeps_a_cpu_model():
    import torch

    model = torch.nn.Linear(2, 2)
    assert schedule.release_device(model, "cpu") is model


def test_unreachable_scheduler_is_a_config_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(schedule, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*dask scheduler"):
        run_tasks(layer_like, make_tasks(1), scheduler=f"127.0.0.1:{port}", progress=False)


# --------------------------------------------------------------------------- real clusters


@pytest.mark.long
def test_local_workers_match_in_process_and_retry_once(tmp_path):
    """workers=2: two worker processes; a failing task is retried once, then reported."""
    tasks = make_tasks(4, marker_dir=str(tmp_path))
    tasks[1]["fail_first"] = 1  # fails once, then succeeds on the retry
    tasks[2]["fail_first"] = 5  # always fails
    reference = run_tasks(layer_like, make_tasks(4), progress=False)

    rows = run_tasks(shipped(layer_like), tasks, workers=2, retries=1, progress=False)

    attempts = {t["task_id"]: len(list(tmp_path.glob(f"{t['task_id']}.*"))) for t in tasks}
    assert attempts == {"l0": 1, "l1": 2, "l2": 2, "l3": 1}
    assert rows[2]["error"] == "RuntimeError: planned failure 2 of l2"
    assert rows[2]["task_id"] == "l2" and rows[2]["layer"] == "block2"
    good = [0, 1, 3]
    assert_same_results([rows[i] for i in good], [reference[i] for i in good])
    assert all(rows[i]["worker"].startswith("tcp://127.0.0.1:") for i in good)
    assert not worker_children()


@pytest.mark.long
def test_pinned_gpu_workers_each_see_one_device():
    """The cluster used without dask-cuda: one process per device, pinned by the environment.

    CUDA_VISIBLE_DEVICES is only an environment variable here (no GPU needed to check it).
    """

    def visible(task):
        return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    plan = ClusterPlan("local-gpu", 2, ("0", "1"))
    with schedule._client(plan) as client:
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(w["resources"]["GPU"] for w in info) == [1, 1]
        assert "2 workers, 2 threads, 2 GPUs" in describe_cluster(client)
        tasks = [{"task_id": f"v{i}", "hold": 0.2} for i in range(6)]
        rows = schedule._run_on_cluster(client, visible, tasks, 1, False, {"GPU": 1})
    by_worker = {}
    for r in rows:
        by_worker.setdefault(r["worker"], set()).add(r["visible"])
    # Each worker always sees the same single device, and the two workers differ.
    assert all(len(v) == 1 for v in by_worker.values())
    assert set().union(*by_worker.values()) <= {"0", "1"}
    assert not worker_children()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    """Workers first (they close cleanly while their scheduler still answers), then it."""
    for group in (procs[1:], procs[:1]):
        for p in group:
            if p.poll() is None:
                p.terminate()
        for p in group:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cli_cluster(tmp_path):
    """`dask scheduler` and two `dask worker` processes (no nanny: the process is the worker)."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    procs = [
        _start(
            [
                "distributed.cli.dask_scheduler",
                "--host=127.0.0.1",
                "--port=0",
                "--no-dashboard",
                f"--scheduler-file={sched_file}",
            ],
            tmp_path / "scheduler.log",
        )
    ]
    try:
        for i in range(2):
            args = [
                "distributed.cli.dask_worker",
                f"--scheduler-file={sched_file}",
                "--host=127.0.0.1",
                "--nthreads=1",
                "--no-nanny",
                "--no-dashboard",
                f"--name=w{i}",
            ]
            procs.append(_start(args, tmp_path / f"worker{i}.log"))
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(scheduler_file=str(sched_file), set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
            pids = client.run(os.getpid)  # worker address -> pid
        yield address, pids
    finally:
        _stop(procs)


SHIFTS = (0.0, 0.25, 0.5, 1.0, 2.0, 8.0)  # perturbed = clean + noise + shift, per layer


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A real activation store whose layers pull clean and perturbed points further apart."""
    from advlens.store import ActivationStore

    path = tmp_path_factory.mktemp("store") / "apgd-ce-linf.zarr"
    n, d, b = 40, 12, 20
    rng = np.random.default_rng(0)
    layers = {f"layer{i}": d for i in range(len(SHIFTS))}
    store = ActivationStore.create(
        path, n=n, layers=layers, batch_size=b, dtype="float32", attrs={"config": {"t": 1}}
    )
    clean = rng.normal(size=(n, d)).astype(np.float32)
    noise = 0.1 * rng.normal(size=(n, d)).astype(np.float32)
    with store.writer() as w:
        for batch in range(n // b):
            s = slice(batch * b, batch * b + b)
            samples = {"index": np.arange(n)[s], "label": np.arange(n)[s] % 4,
                       "pred_clean": np.arange(n)[s] % 4, "pred_perturbed": np.zeros(b),
                       "success": np.ones(b, bool), "norm": np.ones(b)}  # fmt: skip
            acts = {
                f"layer{i}": (clean[s], clean[s] + noise[s] + shift)
                for i, shift in enumerate(SHIFTS)
            }
            w.put(batch, samples, acts)
    return path


def layer_tasks(store: Path, run_dir: Path) -> list:
    """One real layer task per layer, on a private copy of ``store`` (tasks write into it)."""
    from advlens.config import EmbedConfig, OverlapConfig
    from advlens.layer_task import LayerTask

    copy = run_dir / store.name
    shutil.copytree(store, copy)
    embed = EmbedConfig(engine="opentsne", n_iter=250, perplexity=10.0, n_jobs=1, pca_dims=8)
    overlap = OverlapConfig(k=5, k_sweep=(5, 10), bootstrap=0)
    return [
        LayerTask(
            store=str(copy),
            run_dir=str(run_dir),
            attack="apgd-ce",
            norm="linf",
            eps=0.1,
            layer=f"layer{i}",
            layer_index=i,
            engine="opentsne",
            seed=0,
            perplexity=10.0,
            embed=embed,
            overlap=overlap,
            device="cpu",
        )  # fmt: skip
        for i in range(len(SHIFTS))
    ]


def results(rows: list[dict], run_dir: Path) -> list:
    """Each row without timings and task id (it hashes the store path), and the task's map."""
    out = []
    for r in rows:
        assert r["error"] is None, r["error"]
        kept = {k: v for k, v in r.items() if "seconds" not in k and k not in TIMING + ("task_id",)}
        with np.load(run_dir / "tasks" / f"{r['task_id']}.npz") as z:
            out.append((kept, z["xy"].tolist(), z["per_point"].tolist()))
    return out


def held(marker_dir: Path, hold: float):
    """run_layer_task, after leaving a marker ``<layer>@<pid>@<uuid>`` and waiting ``hold`` s."""
    from advlens.layer_task import run_layer_task

    def call(task):
        Path(marker_dir, f"{task.layer}@{os.getpid()}@{uuid.uuid4().hex}").touch()
        time.sleep(hold)
        return run_layer_task(task)

    return call


@pytest.mark.long
def test_cli_cluster_matches_in_process_and_survives_a_killed_worker(
    cli_cluster, tiny_store, tmp_path
):
    """Real layer tasks (reduce, t-SNE, overlap) on `dask scheduler` + two `dask worker`s."""
    from advlens.layer_task import run_layer_task

    address, pids = cli_cluster
    runs = {name: tmp_path / name for name in ("local", "cluster", "killed", "markers")}
    for d in runs.values():
        d.mkdir()
    reference = run_tasks(run_layer_task, layer_tasks(tiny_store, runs["local"]), progress=False)
    overlaps = [r["overlap"] for r in reference]
    assert overlaps[0] > 0.9 and overlaps[-1] == 0.0  # the store's layers separate the sets
    expected = results(reference, runs["local"])

    tasks = layer_tasks(tiny_store, runs["cluster"])
    rows = run_tasks(run_layer_task, tasks, scheduler=address, progress=False)
    assert results(rows, runs["cluster"]) == expected
    assert {r["worker"] for r in rows} == set(pids)  # both workers took part

    # Again, and SIGKILL one worker while it holds a task: the table must still be complete.
    victim_address, victim = sorted(pids.items())[0]
    tasks = layer_tasks(tiny_store, runs["killed"])
    out: dict = {}
    fn = held(runs["markers"], hold=1.0)
    runner = threading.Thread(
        target=lambda: out.update(rows=run_tasks(fn, tasks, scheduler=address, progress=False))
    )
    runner.start()
    deadline = time.monotonic() + 60
    while not list(runs["markers"].glob(f"*@{victim}@*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(runs["markers"].glob(f"*@{victim}@*")), "the victim worker never started a task"
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive()

    rows = out["rows"]
    assert results(rows, runs["killed"]) == expected
    # A task the victim had started ran again, to the end, on the surviving worker.
    pids_by_layer: dict[str, set[int]] = {}
    for marker in runs["markers"].iterdir():
        layer, pid, _ = marker.name.split("@")
        pids_by_layer.setdefault(layer, set()).add(int(pid))
    rerun = [layer for layer, p in pids_by_layer.items() if victim in p and len(p) == 2]
    assert rerun
    survivor = next(a for a in pids if a != victim_address)
    assert {r["worker"] for r in rows if r["layer"] in rerun} == {survivor}


@pytest.mark.gpu
def test_gpu_workers_each_own_one_gpu():
    """dask-cuda shows each worker every GPU, its own first; our cluster shows only that one.
    Either way a worker's cuda:0 is its own GPU and no two workers share one."""
    import torch

    def device(task):
        import torch

        from advlens.schedule import worker_gpu

        visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
        return {"count": torch.cuda.device_count(), "n_visible": len(visible),
                "own": worker_gpu()}  # fmt: skip

    n = torch.cuda.device_count()
    tasks = [{"task_id": f"g{i}"} for i in range(2 * n)]
    rows = run_tasks(device, tasks, workers=n, progress=False)
    assert all(r["error"] is None and r["count"] == r["n_visible"] for r in rows)
    own = {}
    for r in rows:
        own.setdefault(r["worker"], set()).add(r["own"])
    assert all(len(v) == 1 for v in own.values())
    assert len({next(iter(v)) for v in own.values()}) == len(own)  # no GPU shared
