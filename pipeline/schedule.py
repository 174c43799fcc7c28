"""Run independent tasks (one per layer, norm, engine, seed) in process or on a Dask cluster.

:func:`run_tasks` submits one Dask task per item and collects the result rows as they finish,
with a progress bar and per-task timings. Where the tasks run:

- ``workers=0`` and no scheduler: in the calling process, in order (no cluster; what tests use);
  on a machine with several GPUs, one worker per GPU instead (below).
- ``scheduler="tcp://host:8786"``: an existing cluster (``dask scheduler`` + ``dask worker`` or
  ``dask cuda worker`` processes, dask-jobqueue, ...); every worker needs advlens installed and
  the run folder on a shared file system.
- GPUs (``gpus``: indices, empty for all visible ones): dask-cuda's ``LocalCUDACluster`` where
  dask-cuda is installed, else a local cluster of worker processes pinned to one GPU each
  through ``CUDA_VISIBLE_DEVICES``; each worker offers the resource ``GPU=1`` and runs one task
  at a time.
- CPU only, ``workers=N``: N single-threaded worker processes.

A task that raises is retried ``retries`` times, then reported as a row with its identity and
its ``error`` while the other tasks finish. A worker that dies (killed, out of memory) loses
its running task to another worker. Tasks skip outputs that already exist and write with
:func:`advlens._io.atomic_write`, so an interrupted schedule resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from distributed import (
    Client,
    LocalCluster,
    Nanny,
    Scheduler,
    SpecCluster,
    as_completed,
    get_worker,
)
from distributed.system import MEMORY_LIMIT
from threadpoolctl import threadpool_limits

from advlens import _optional
from advlens._env import gpu_count
from advlens._optional import require
from advlens.errors import ConfigError
from advlens.progress import bar

__all__ = [
    "ClusterPlan",
    "describe_cluster",
    "driver_device",
    "list_gpus",
    "plan_cluster",
    "run_tasks",
    "task_id",
    "worker_gpu",
]

log = logging.getLogger(__name__)

KINDS = ("in-process", "scheduler", "local-cuda", "local-gpu", "local-cpu")
CONNECT_TIMEOUT = "20s"  # how long to wait for an existing scheduler to answer
TASK_THREADS = 1  # BLAS and torch CPU threads inside a task (see pinned_threads)
PROBE_TIMEOUT = 2.0  # seconds: is anything listening at the scheduler's address at all?


@dataclass(frozen=True)
class ClusterPlan:
    """Where tasks will run: ``kind`` (one of :data:`KINDS`), worker count, pinned devices."""

    kind: str
    n_workers: int = 0
    devices: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES value of each worker, in order
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.devices and len(self.devices) != self.n_workers:
            raise ValueError(f"{len(self.devices)} devices for {self.n_workers} workers")

    def describe(self) -> str:
        if self.kind == "in-process":
            return "in-process (no Dask cluster)"
        if self.kind == "scheduler":
            return f"existing Dask scheduler at {self.address}"
        if self.kind == "local-cpu":
            return f"local Dask cluster: {self.n_workers} single-threaded CPU worker processes"
        how = "dask-cuda LocalCUDACluster" if self.kind == "local-cuda" else "local Dask cluster"
        return f"{how}: {self.n_workers} workers pinned to GPUs {','.join(self.devices)}"


def run_tasks(
    fn: Callable[[Any], Mapping[str, Any]],
    tasks: Sequence[Any],
    *,
    workers: int = 0,
    scheduler: str | None = None,
    gpus: Sequence[int] = (),
    retries: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``fn(task)`` for every task; return the rows in task order.

    Each row is ``fn``'s dict plus ``seconds_task`` (time inside ``fn``), ``worker`` (the
    worker's address, ``"local"`` in process) and ``error`` (None). A task still failing after
    ``retries`` retries yields its identity (``task.identity()``, else its scalar fields),
    ``task_id`` and ``error`` (``"ExceptionType: message"``) instead. ``fn`` and the tasks must
    be picklable when a cluster is used (a module-level function and frozen dataclasses).
    """
    tasks = list(tasks)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(
            f"schedule.workers = {workers!r}: must be an integer >= 0 (0: in process)"
        )
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"schedule.retries = {retries!r}: must be an integer >= 0")
    if not tasks:
        return []
    plan = plan_cluster(workers=workers, scheduler=scheduler, gpus=gpus)
    log.info("%d tasks on %s", len(tasks), plan.describe())
    if plan.kind == "in-process":
        return _run_in_process(fn, tasks, retries, progress)
    with _client(plan) as client:
        log.info("%s", describe_cluster(client))
        return _run_on_cluster(client, fn, tasks, retries, progress, _resources(plan, client))


# --------------------------------------------------------------------------- cluster choice


def list_gpus(gpus: Sequence[int] = ()) -> tuple[int, ...]:
    """Indices of the CUDA GPUs to use: ``gpus`` (validated) or all visible ones."""
    count = gpu_count()
    if not gpus:
        return tuple(range(count))
    chosen = tuple(dict.fromkeys(int(g) for g in gpus))
    bad = [g for g in chosen if not 0 <= g < count]
    if bad:
        have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise ConfigError(
            f"schedule.gpus = {','.join(map(str, gpus))}: GPU {bad[0]} does not exist (this "
            f"machine shows {have}); pass indices from that range, or no --gpus for all of them"
        )
    return chosen


def plan_cluster(
    *, workers: int = 0, scheduler: str | None = None, gpus: Sequence[int] = ()
) -> ClusterPlan:
    """Decide where tasks run (see the module docstring); starts nothing."""

    if scheduler:
        return ClusterPlan("scheduler", address=_address(scheduler))
    ids = list_gpus(gpus)
    if not ids:
        return ClusterPlan("local-cpu", workers) if workers else ClusterPlan("in-process")
    if workers == 0 and len(ids) == 1 and ids[0] == 0:
        return ClusterPlan("in-process")  # one GPU: the calling process already uses cuda:0
    n = workers or len(ids)
    physical = _physical_ids(ids)
    devices = tuple(physical[i % len(physical)] for i in range(n))
    # LocalCUDACluster runs one worker per GPU; more workers than GPUs need our own cluster.
    kind = "local-cuda" if n <= len(ids) and _optional.has("dask_cuda") else "local-gpu"
    return ClusterPlan(kind, n, devices)


def check_plan(
    *, workers: int = 0, scheduler: str | None = None, gpus: Sequence[int] = ()
) -> ClusterPlan:
    """:func:`plan_cluster`, plus a quick check that a named scheduler listens (before any work).

    Raises ConfigError for GPUs that do not exist or an address where nothing listens.
    """
    plan = plan_cluster(workers=workers, scheduler=scheduler, gpus=gpus)
    if plan.kind == "scheduler" and plan.address and plan.address.startswith(("tcp://", "tls://")):
        host, _, port = plan.address.split("://", 1)[1].rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
                pass
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"schedule.scheduler = {plan.address!r}: nothing listens there ({exc}); start "
                "one with `dask scheduler`, or fix --scheduler (host:port)"
            ) from None
    return plan


def describe_cluster(
    client: Any = None, *, workers: int = 0, scheduler: str | None = None, gpus: Sequence[int] = ()
) -> str:
    """One line for logs: the running cluster behind ``client``, else the plan for the options."""
    if client is None:
        return plan_cluster(workers=workers, scheduler=scheduler, gpus=gpus).describe()
    info = client.scheduler_info(n_workers=-1)
    ws = info.get("workers", {}).values()
    threads = sum(w.get("nthreads", 0) for w in ws)
    gpu = sum(w.get("resources", {}).get("GPU", 0) for w in ws)
    text = f"Dask scheduler {info.get('address')}: {len(ws)} workers, {threads} threads"
    if gpu:
        text += f", {gpu:g} GPUs"
    link = getattr(client, "dashboard_link", None)
    return text + (f", dashboard {link}" if link else "")


def worker_gpu() -> str | None:
    """The GPU this worker process owns: the first entry of its ``CUDA_VISIBLE_DEVICES``.

    Our own GPU cluster shows each worker exactly one GPU; dask-cuda's ``LocalCUDACluster``
    shows each worker every GPU, rotated so that its own comes first (``torch.cuda`` then
    counts them all, and ``cuda:0`` is the worker's own). Tasks therefore use ``cuda`` (=
    ``cuda:0``) and never count GPUs. None where the variable is unset.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    return parts[0] if parts else None


def driver_device(device: str, gpus: Sequence[int] = ()) -> str:
    """Where the calling process (model, attack, extraction) runs: ``cuda`` becomes the first
    chosen GPU (``--gpus 1``: ``cuda:1``), so that the driver stays off GPUs it was not given;
    an indexed device or the CPU is kept."""
    if device == "cuda" and gpus:
        return f"cuda:{int(gpus[0])}"
    return device


def release_device(model: Any, device: str) -> Any:
    """Move the driver's ``model`` to the CPU and return torch's cached GPU memory, before
    GPU workers (one of them maybe pinned to the driver's GPU) start their tasks."""
    if not str(device).startswith("cuda"):
        return model

    model = model.to("cpu")
    torch.cuda.empty_cache()
    return model


def _physical_ids(ids: Sequence[int]) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` values for logical GPU indices, honouring the caller's own."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    parts = [p.strip() for p in visible.split(",") if p.strip()] if visible else []
    return [parts[i] if i < len(parts) else str(i) for i in ids]


def _address(scheduler: str) -> str:
    scheduler = scheduler.strip()
    return scheduler if "://" in scheduler else f"tcp://{scheduler}"


def _resources(plan: ClusterPlan, client: Any) -> dict[str, float] | None:
    """One GPU per task where the workers offer GPUs (ours always do; others may)."""
    if plan.kind in ("local-cuda", "local-gpu"):
        return {"GPU": 1}
    if plan.kind == "scheduler":
        ws = client.scheduler_info(n_workers=-1).get("workers", {}).values()
        if any(w.get("resources", {}).get("GPU") for w in ws):
            return {"GPU": 1}
    return None


@contextlib.contextmanager
def _client(plan: ClusterPlan) -> Iterator[Any]:
    if plan.kind == "scheduler":
        try:
            client = Client(plan.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"schedule.scheduler = {plan.address!r}: no Dask scheduler answers there ({exc}); "
                "start one with `dask scheduler` or fix --scheduler"
            ) from None
        with client:
            if not client.scheduler_info(n_workers=-1).get("workers"):
                log.warning("scheduler %s has no workers yet; tasks wait for them", plan.address)
            yield client
        return
    cluster = _start_cluster(plan)
    try:
        with Client(cluster, set_as_default=False) as client:
            yield client
    finally:
        cluster.close()


def _start_cluster(plan: ClusterPlan) -> Any:
    # ":0": a free port, so that several runs (or users) on one machine never clash.
    common = {"dashboard_address": ":0", "threads_per_worker": 1}
    if plan.kind == "local-cpu":
        return LocalCluster(n_workers=plan.n_workers, processes=True, **common)
    if plan.kind == "local-cuda":
        dask_cuda = require("dask_cuda", "one Dask worker per GPU")
        return dask_cuda.LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=",".join(plan.devices),
            n_workers=plan.n_workers,
            resources={"GPU": 1},
            **common,
        )
    # One Nanny per worker, each with its own CUDA_VISIBLE_DEVICES: the worker process sees
    # exactly one GPU, as cuda:0. Host memory is shared out evenly.
    workers = {
        f"gpu{dev}-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "env": {"CUDA_VISIBLE_DEVICES": dev},
                "resources": {"GPU": 1},
                "memory_limit": MEMORY_LIMIT // plan.n_workers,
                "dashboard_address": ":0",
            },
        }
        for i, dev in enumerate(plan.devices)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="advlens")


# --------------------------------------------------------------------------- running


def task_id(task: Any, position: int = 0) -> str:
    """A readable name for ``task``: its ``task_id`` attribute or key, else ``task-<position>``."""
    value = task.get("task_id") if isinstance(task, Mapping) else getattr(task, "task_id", None)
    if callable(value):
        value = value()
    return str(value) if value else f"task-{position}"


def _identity(task: Any, position: int) -> dict[str, Any]:
    """The fields that say which task a row belongs to (JSON-friendly scalars only)."""
    if callable(getattr(task, "identity", None)):
        fields = dict(task.identity())
    elif isinstance(task, Mapping):
        fields = dict(task)
    elif dataclasses.is_dataclass(task) and not isinstance(task, type):
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    else:
        fields = {}
    fields = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in fields.items()
        if v is None or isinstance(v, str | int | float | bool | Path)
    }
    fields.setdefault("task_id", task_id(task, position))
    return fields


def _call(fn: Callable[[Any], Mapping[str, Any]], task: Any, worker: str | None = None) -> dict:
    """Run one task (on a worker or in process) and add its timing and worker."""
    t0 = time.perf_counter()
    with pinned_threads():
        out = fn(task)
    seconds = time.perf_counter() - t0
    if not isinstance(out, Mapping):
        raise TypeError(f"the task function must return a dict, got {type(out).__name__}")
    row = dict(out)
    row.setdefault("error", None)
    row["seconds_task"] = seconds
    row["worker"] = worker or _worker_address()
    return row


@contextlib.contextmanager
def pinned_threads(n: int = TASK_THREADS) -> Iterator[None]:
    """Run the block with ``n`` BLAS and torch CPU threads, then restore the previous counts.

    Thread counts change floating-point sums (PCA's matrix products differ between one and
    two BLAS threads); Dask workers start with one, so every task gets one wherever it runs.
    t-SNE threads are the engine's own (``embed.n_jobs``, resolved once per run).
    """

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def _worker_address() -> str:
    try:
        return get_worker().address
    except ValueError:  # not inside a Dask worker
        return "local"


def _error_row(task: Any, position: int, exc: BaseException) -> dict[str, Any]:
    message = f"{type(exc).__name__}: {exc}"
    log.warning("task %s failed: %s", task_id(task, position), message)
    return _identity(task, position) | {"error": message, "seconds_task": None, "worker": None}


def _bar(total: int, progress: bool):
    # A bar with rate and time left on a terminal, log lines elsewhere or with --quiet.
    return bar(total=total, desc="layer tasks", unit="task", enabled=None if progress else False)


def _run_in_process(fn, tasks: list, retries: int, progress: bool) -> list[dict[str, Any]]:
    rows = []
    with _bar(len(tasks), progress) as bar:
        for i, task in enumerate(tasks):
            for attempt in range(retries + 1):
                try:
                    rows.append(_call(fn, task, worker="local"))
                    break
                except Exception as exc:  # a task's failure must not stop the others
                    if attempt == retries:
                        rows.append(_error_row(task, i, exc))
                    else:
                        log.info("task %s failed (%s); retrying", task_id(task, i), exc)
            bar.update()
    return rows


def _run_on_cluster(client, fn, tasks: list, retries: int, progress: bool, resources) -> list:
    token = uuid.uuid4().hex[:8]  # keys stay unique if the same tasks run again on one cluster
    futures = [
        client.submit(
            _call,
            fn,
            task,
            key=f"{task_id(task, i)}-{token}",
            pure=False,
            retries=retries,
            resources=resources,
        )
        for i, task in enumerate(tasks)
    ]
    position = {f.key: i for i, f in enumerate(futures)}
    rows: list[dict[str, Any] | None] = [None] * len(tasks)
    with _bar(len(tasks), progress) as bar:
        for fut in as_completed(futures, loop=client.loop):
            i = position[fut.key]
            if fut.status == "finished":
                rows[i] = fut.result()
            else:  # "error" after the retries, or "cancelled" (scheduler lost)
                try:
                    exc = fut.exception()
                except Exception as err:  # CancelledError and the like
                    exc = err
                rows[i] = _error_row(tasks[i], i, exc)
            fut.release()
            bar.update()
    return rows
