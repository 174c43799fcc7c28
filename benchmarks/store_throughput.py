"""Store write throughput and peak memory: does host memory stay flat as N grows?

Writes one layer (D = 16,384, float16, clean + perturbed) of N = 2,000 and N = 16,000
samples through :meth:`ActivationStore.writer` in batches of 250 (the default attack batch).
Each size runs in its own child process so that its peak resident memory (``ru_maxrss``) is
its own. Target: peak(16,000) / peak(2,000) < 1.2. Throughput counts raw activation bytes
(N x D x 2 bytes x 2 sets) per second of writing, compression (Blosc zstd) included.

    .venv/bin/python benchmarks/store_throughput.py              # -> benchmarks/results/
    .venv/bin/python benchmarks/store_throughput.py --sizes 500 4000 --d 4096

The activations are ReLU-like (about half zeros, smooth positive values), drawn once into a
pool of batches that is cycled, so the producer costs nothing and the store is measured.
Needs about 1 GB of temporary disk for N = 16,000 (deleted afterwards). On a shared machine
the load average (recorded in the JSON) lowers throughput; memory is not affected.

Extraction memory (``--wrn-batches``, default 1; 0 skips it): attack + extract of WRN-28-10
(random weights, its ``auto`` layers, float16) with ``attack.batch_size = 250`` into a store,
once with the default budget (``attack.memory_mb = 2048``: sub-batches, bounded writer queue)
and once without (``memory_mb = 0``, the whole batch at once: the "before" figure, skipped with
``--no-before``), each in a fresh child process. Target: peak RSS under 4 GB with the budget.
Labels are the model's own predictions so that every image is attacked (the worst case), and
APGD runs ``--wrn-iter`` (default 1) iterations: its memory does not depend on the iteration
count, only its time does (one batch of 250 takes minutes on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from advlens._env import cpu_name, versions

RESULTS = Path(__file__).resolve().parent / "results"


def child(n: int, d: int, batch: int, workdir: Path) -> dict:
    """Write one store of n samples; return timings and this process's peak RSS."""
    import numpy as np

    from advlens.store import ActivationStore

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(4):  # ReLU-like activations: smooth along features, half zeros
        base = np.cumsum(rng.standard_normal((batch, d), dtype=np.float32), axis=1) / 30
        pool.append(np.maximum(base, 0).astype(np.float16))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = workdir / f"bench-{n}.zarr"
    store = ActivationStore.create(
        path, n=n, layers={"layer": d}, batch_size=batch, dtype="float16", attrs={}
    )
    t0, c0 = time.perf_counter(), time.process_time()
    with store.writer(max_queue=4) as w:
        for b in range(store.n_batches):
            r0, r1 = store.batch_rows(b)
            rows = r1 - r0
            w.put(
                b,
                {
                    "index": np.arange(r0, r1),
                    "label": np.zeros(rows, np.int64),
                    "pred_clean": np.zeros(rows, np.int64),
                    "pred_perturbed": np.ones(rows, np.int64),
                    "success": np.ones(rows, bool),
                    "norm": np.ones(rows, np.float32),
                },
                {"layer": (pool[b % 4][:rows], pool[(b + 1) % 4][:rows])},
            )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert store.is_complete()
    raw = 2 * n * d * 2
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "n": n,
        "d": d,
        "batch_size": batch,
        "seconds": seconds,
        "raw_bytes": raw,
        "stored_bytes": stored,
        "compression_ratio": raw / stored,
        "gb_per_s": raw / seconds / 1e9,
        "cpu_seconds": cpu,  # all threads of this process: less sensitive to a loaded machine
        "gb_per_cpu_s": raw / cpu / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_write_mb": rss_before / 1024,
    }


def extraction_child(batches: int, memory_mb: int, n_iter: int, workdir: Path) -> dict:
    """Attack and extract ``batches`` batches of 250 CIFAR-shaped images through WRN-28-10."""
    import numpy as np
    import torch

    from advlens.attacks import get_attack
    from advlens.data import synthetic
    from advlens.extract import extract, plan_queue, plan_sub_batch
    from advlens.models.taps import catalog, select_layers
    from advlens.models.wrn import WideResNet
    from advlens.store import ActivationStore

    batch, shape = 250, (3, 32, 32)
    torch.manual_seed(0)
    model = WideResNet(28, 10).eval()
    data = synthetic(n=batches * batch, shape=shape, seed=0)
    with torch.no_grad():  # labels = predictions: every image is attacked
        x = torch.from_numpy(data.images)
        pred = torch.cat([model(x[i : i + 25]).argmax(1) for i in range(0, len(x), 25)])
    data = dataclasses.replace(data, labels=pred.numpy().astype(np.int64))
    infos = catalog(model, shape)
    layers = select_layers(infos, ["auto"], include_input=True)
    widths = {i.name: i.size for i in infos if i.name in layers}
    sub = plan_sub_batch(model, shape, batch, memory_mb)
    queue = plan_queue(batch * sum(widths.values()) * 2 * 2, memory_mb)
    attack = get_attack("apgd-ce", "linf", 8 / 255, n_iter=n_iter, sub_batch=sub)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store = ActivationStore.create(workdir / "wrn.zarr", n=len(pred), layers=widths,
                                   batch_size=batch, dtype="float16", attrs={})  # fmt: skip
    t0 = time.perf_counter()
    extract(model, data, attack, store, layers, device="cpu", progress=False, sub_batch=sub,
            max_queue=queue)  # fmt: skip
    assert store.is_complete()
    return {
        "memory_mb": memory_mb,
        "sub_batch": sub,
        "writer_queue": queue,
        "batch_size": batch,
        "batches": batches,
        "n_iter": n_iter,
        "layers": widths,
        "seconds": time.perf_counter() - t0,
        "rss_before_extract_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def extraction_runs(args) -> list[dict]:
    runs = []
    for memory_mb in (2048, 0)[: 1 if args.no_before else 2]:
        workdir = Path(tempfile.mkdtemp(prefix="advlens-wrn-bench-", dir=args.tmp))
        try:
            cmd = [sys.executable, __file__, "--wrn-child", str(memory_mb), "--workdir",
                   str(workdir), "--wrn-batches", str(args.wrn_batches), "--wrn-iter",
                   str(args.wrn_iter)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        run = json.loads(out.strip().splitlines()[-1])
        runs.append(run)
        label = "budget" if memory_mb else "whole batch (before)"
        print(f"WRN-28-10 extraction, batch 250, {label} memory_mb={memory_mb}: sub-batch "
              f"{run['sub_batch']}, writer queue {run['writer_queue']}, peak RSS "
              f"{run['peak_rss_mb']:.0f} MB, {run['seconds']:.0f} s")  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 16000], metavar="N")
    parser.add_argument("--d", type=int, default=16_384, help="layer width")
    parser.add_argument("--batch", type=int, default=250, help="write batch (shard rows)")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary stores")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--wrn-batches", type=int, default=1,
                        help="WRN-28-10 extraction batches of 250 (0: skip)")  # fmt: skip
    parser.add_argument("--wrn-iter", type=int, default=1, help="APGD iterations there")
    parser.add_argument("--no-before", action="store_true",
                        help="skip the whole-batch extraction (about 7 GB)")  # fmt: skip
    parser.add_argument("--wrn-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(child(args.child, args.d, args.batch, args.workdir)))
        return
    if args.wrn_child is not None:
        print(json.dumps(extraction_child(args.wrn_batches, args.wrn_child, args.wrn_iter,
                                          args.workdir)))  # fmt: skip
        return

    runs = []
    for n in args.sizes:
        workdir = Path(tempfile.mkdtemp(prefix="advlens-store-bench-", dir=args.tmp))
        try:
            cmd = [sys.executable, __file__, "--child", str(n), "--d", str(args.d)]
            cmd += ["--batch", str(args.batch), "--workdir", str(workdir)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        run = json.loads(out.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"N={n:>6} D={args.d}: {run['gb_per_s']:.3f} GB/s raw "
            f"({run['raw_bytes'] / 1e9:.2f} GB in {run['seconds']:.1f} s, compression "
            f"{run['compression_ratio']:.2f}x; {run['gb_per_cpu_s']:.3f} GB per CPU-second), peak RSS {run['peak_rss_mb']:.0f} MB"
        )
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    verdict = "meets" if ratio < 1.2 else "MISSES"
    print(f"peak memory ratio N={args.sizes[1]} / N={args.sizes[0]}: {ratio:.3f} "
          f"({verdict} the < 1.2 target)")  # fmt: skip
    wrn = extraction_runs(args) if args.wrn_batches > 0 else []
    extraction = None
    if wrn:
        peak = wrn[0]["peak_rss_mb"]
        extraction = {"runs": wrn, "target_peak_rss_mb": 4096, "meets_target": peak < 4096}
        if len(wrn) > 1:
            extraction["peak_rss_ratio_before_over_budget"] = wrn[1]["peak_rss_mb"] / peak
        print(f"WRN-28-10 extraction peak RSS with the budget: {peak:.0f} MB "
              f"({'meets' if peak < 4096 else 'MISSES'} the < 4 GB target)")  # fmt: skip
    result = {
        "benchmark": "store_throughput",
        "device": "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "versions": versions("advlens", "numpy", "zarr", "numcodecs"),
        "dtype": "float16",
        "runs": runs,
        "peak_rss_ratio": ratio,
        "target_peak_rss_ratio": 1.2,
        "meets_target": ratio < 1.2,
        "extraction_wrn28_10": extraction,
    }
    out_path = args.out or RESULTS / "store_throughput-cpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
