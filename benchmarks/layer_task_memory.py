"""Peak memory of one layer task (reduce + embed + overlap) as N grows, at WRN-28-10 width.

Builds one store per N (N = 1,000, 4,000 and 16,000 by default) with a single layer of
D = 163,840 values (the shape of WRN-28-10's ``block1``), float16, batches of 250, then runs
the real :func:`advlens.layer_task.run_layer_task` on it in a fresh child process and records
that process's peak resident memory (``VmHWM``; ``ru_maxrss`` would include the parent's). The PCA streams the layer from the store
in blocks sized by ``embed.memory_budget`` (default ``auto``), so the peak should not grow
with N. Targets: largest / smallest peak <= 1.5, every peak < 2 GB.

    .venv/bin/python benchmarks/layer_task_memory.py            # -> benchmarks/results/
    .venv/bin/python benchmarks/layer_task_memory.py --sizes 500 2000 --d 16384

Rows are synthetic, with structure: a rank-32 signal (four classes, decaying spectrum) plus
noise, ReLU'd; a perturbed row is its clean row shifted along a fixed direction plus noise.
The noise rows are windows of one long pool of normals at random offsets, so that building the
N = 16,000 store (about 10 GB, written into ``--scratch`` and deleted afterwards) takes minutes
rather than drawing 5 billion normals.

To fit about 20 minutes on 2 cores the task runs t-SNE with ``--n-iter 500`` (default; the
package default is 1,000: t-SNE's memory does not depend on the iteration count, only its time)
and ``--bootstrap 20`` half-sample draws (default 200). Both are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WRN_BLOCK1 = 163_840  # 160 channels x 32 x 32
RANK = 32
ROW_FIELDS = ("n", "value", "calibrated", "auc", "overlap_reduced", "seconds_reduce",
              "seconds_embed", "seconds_overlap", "reduce_method", "memory_budget")  # fmt: skip


def build(path: Path, n: int, d: int, batch: int, seed: int = 0) -> float:
    """Write a synthetic store of n samples, one layer ``block1`` of width d; seconds taken."""
    import numpy as np
    import torch

    from advlens.store import ActivationStore

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn((RANK, d), generator=gen) / RANK**0.5
    spectrum = torch.logspace(np.log10(4.0), np.log10(0.5), RANK)
    centres = torch.randn((4, RANK), generator=gen) * 1.5
    direction = torch.randn(d, generator=gen) * 0.3
    # Noise: windows of one long pool at random offsets (no two rows the same vector).
    pool = torch.randn(2 * batch * d, generator=gen) * 0.3
    store = ActivationStore.create(
        path, n=n, layers={"block1": d}, batch_size=batch, dtype="float16",
        attrs={"config": {"benchmark": "layer_task_memory"}}, overwrite=True,
    )  # fmt: skip
    with store.writer(max_queue=2) as w:
        for b in range(store.n_batches):
            r0, r1 = store.batch_rows(b)
            rows = r1 - r0
            labels = np.arange(r0, r1) % 4
            z = (centres[labels] + torch.randn((rows, RANK), generator=gen)) * spectrum
            signal = z @ basis
            offs = torch.randint(0, batch * d, (2,), generator=gen).tolist()
            noise = [pool[o : o + rows * d].view(rows, d) for o in offs]
            clean = torch.relu(signal + noise[0]).half().numpy()
            pert = torch.relu(signal + direction + noise[1]).half().numpy()
            samples = {
                "index": np.arange(r0, r1), "label": labels, "pred_clean": labels,
                "pred_perturbed": (labels + 1) % 4, "success": np.ones(rows, bool),
                "norm": np.ones(rows, np.float32),
            }  # fmt: skip
            w.put(b, samples, {"block1": (clean, pert)})
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which starts afresh at exec. (Linux
    keeps ``ru_maxrss`` across exec, so a child would report its parent's peak at fork.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(store: str, run_dir: str, n_iter: int, bootstrap: int, budget: str) -> dict:
    """Run one layer task on ``store``; return its row's essentials and this process's peak."""
    from advlens.config import EmbedConfig, OverlapConfig
    from advlens.layer_task import LayerTask, run_layer_task

    t0 = time.perf_counter()
    embed = EmbedConfig(engine="opentsne", n_iter=n_iter, n_jobs=2, pca_dims=50,
                        memory_budget=budget)  # fmt: skip
    task = LayerTask(
        store=store, run_dir=run_dir, attack="synthetic", norm="linf", eps=0.0, layer="block1",
        layer_index=0, engine="opentsne", seed=0, perplexity=30.0, embed=embed,
        overlap=OverlapConfig(bootstrap=bootstrap), device="cpu",
    )  # fmt: skip
    row = run_layer_task(task)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        **{k: row[k] for k in ROW_FIELDS},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--d", type=int, default=WRN_BLOCK1)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--n-iter", type=int, default=500, help="t-SNE iterations (package: 1000)")
    p.add_argument("--bootstrap", type=int, default=20, help="half-sample draws (package: 200)")
    p.add_argument("--budget", default="auto", help="embed.memory_budget")
    p.add_argument("--scratch", type=Path, default=Path("/work/scratch-bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("STORE", "RUN_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--build", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        print(build(Path(args.build[0]), int(args.build[1]), args.d, args.batch), flush=True)
        return 0
    if args.child:
        out = child(*args.child, args.n_iter, args.bootstrap, args.budget)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    from advlens._env import cpu_name, versions
    from advlens.config import memory_bytes

    t_all = time.perf_counter()
    args.scratch.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.sizes:
        work = args.scratch / f"layer-task-{n}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        try:
            path = work / "store.zarr"
            # Built in a child as well: the parent stays small (it measures nothing itself).
            cmd = [sys.executable, __file__, "--build", str(path), str(n), "--d", str(args.d),
                   "--batch", str(args.batch)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"building the store for N = {n} failed")
            seconds_build = float(proc.stdout.split()[-1])
            disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            cmd = [sys.executable, __file__, "--child", str(path), str(work / "run"),
                   "--n-iter", str(args.n_iter), "--bootstrap", str(args.bootstrap),
                   "--budget", str(args.budget)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"layer task at N = {n} failed")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            got = json.loads(line[len("RESULT ") :])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        got |= {"store_gb_on_disk": disk / 1e9, "seconds_build": seconds_build,
                "joint_float32_gb": 2 * n * args.d * 4 / 1e9}  # fmt: skip
        runs.append(got)
        print(f"N = {n:>6}: peak RSS {got['peak_rss_mb']:,.0f} MB (joint matrix as float32: "
              f"{got['joint_float32_gb']:.1f} GB; store {got['store_gb_on_disk']:.1f} GB), "
              f"task {got['seconds']:.0f} s (reduce {got['seconds_reduce']:.0f} s, "
              f"{got['reduce_method']}), build {seconds_build:.0f} s", flush=True)  # fmt: skip
    peaks = [r["peak_rss_mb"] for r in runs]
    ratio = max(peaks) / min(peaks)
    result = {
        "benchmark": "layer_task_memory",
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "d": args.d,
        "dtype": "float16",
        "batch_size": args.batch,
        "memory_budget_setting": args.budget,
        "memory_budget_bytes": memory_bytes(args.budget),
        "tsne_n_iter": args.n_iter,
        "bootstrap": args.bootstrap,
        "note": f"t-SNE n_iter lowered to {args.n_iter} and overlap.bootstrap to "
        f"{args.bootstrap} to fit ~20 min on 2 cores; memory does not depend on either",
        "runs": runs,
        "peak_ratio_largest_smallest": ratio,
        "all_peaks_under_2gb": all(p < 2000 for p in peaks),
        "targets": {"peak_ratio_max": 1.5, "peak_mb_max": 2000},
        "seconds_total": time.perf_counter() - t_all,
        "versions": versions("torch", "numpy", "zarr", "openTSNE", "scikit-learn"),
    }
    print(f"peaks {', '.join(f'{p:,.0f}' for p in peaks)} MB; largest / smallest {ratio:.2f} "
          f"(target <= 1.5); all under 2 GB: {result['all_peaks_under_2gb']}; "
          f"{result['seconds_total'] / 60:.1f} min")  # fmt: skip
    out = args.out or RESULTS / "layer_task_memory-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
