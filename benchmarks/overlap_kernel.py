"""Benchmark the exact 2-D kNN behind the overlap metric: NumPy grid reference, SciPy cKDTree
(all cores; the baseline), cKDTree made exact (ties by index; "kdtree_exact") and the CUDA grid
kernel, on t-SNE-like maps of 2e5 and 2e6 points.

Usage:
    python benchmarks/overlap_kernel.py            # 2e5 and 2e6 points, k = 10
    python benchmarks/overlap_kernel.py --small    # 2e4 and 2e5 points (a quick CPU run)
    python benchmarks/overlap_kernel.py --sizes 1000000 --k 20 --data uniform

Prints seconds and speed-ups over cKDTree (baseline seconds / path seconds) and writes
benchmarks/results/overlap_kernel-<device>.json (device name, CPU count, versions). Each path's
neighbours are checked against the NumPy reference (or against cKDTree for the sizes where the
reference is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from advlens._env import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("numpy", "kdtree_exact", "gpu")


def tsne_like(n: int, seed: int = 0) -> np.ndarray:
    """Clusters of different sizes and spreads plus a thin halo, float32 like t-SNE output."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 2)) * 35
    weights = rng.dirichlet(np.full(10, 2.0))
    which = rng.choice(10, size=n, p=weights)
    spread = rng.uniform(1.5, 6.0, size=10)[which, None]
    xy = centres[which] + rng.standard_t(5, size=(n, 2)) * spread
    return xy.astype(np.float32)


def uniform(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-50, 50, size=(n, 2)).astype(np.float32)


def gpu():
    """(cupy module, device name) or (None, reason)."""
    from advlens._optional import require

    try:
        cp = require("cupy", "the GPU path of this benchmark")
        if cp.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device"
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return cp, name
    except Exception as exc:  # not installed, no driver
        return None, f"cupy unusable: {type(exc).__name__}: {exc}"


def timed(fn, repeat: int, sync=None) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2e4 and 2e5 points (quick CPU run)")
    ap.add_argument("--sizes", type=int, nargs="+", help="point counts (overrides --small)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=("tsne-like", "uniform"), default="tsne-like")
    ap.add_argument("--repeat", type=int, default=1, help="CPU repeats (best of)")
    ap.add_argument("--gpu-repeat", type=int, default=10, help="GPU repeats (best of)")
    ap.add_argument("--numpy-max", type=int, default=2_000_000, help="skip NumPy above this n")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/...)")
    args = ap.parse_args(argv)

    import scipy
    from scipy.spatial import cKDTree

    import advlens
    from advlens.kernels import knn2d

    sizes = args.sizes or ([20_000, 200_000] if args.small else [200_000, 2_000_000])
    make = tsne_like if args.data == "tsne-like" else uniform
    k = args.k
    cp, gpu_name = gpu()
    notes = [] if cp else [f"GPU path skipped: {gpu_name}"]
    device = gpu_name if cp else cpu_name()
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "advlens": advlens.__version__,
    }
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    if cp:
        versions["cupy"] = cp.__version__
        versions["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        knn2d(cp.asarray(make(5000, seed=1)), k)  # compile the kernel outside the timings
        cp.cuda.Stream.null.synchronize()

    print(f"device: {device}; CPU: {cpu_name()} x {os.cpu_count()}; k = {k}; data: {args.data}")
    rows = []
    for n in sizes:
        xy = make(n)
        row: dict = {"n": n}
        t, (dist, _) = timed(lambda xy=xy: cKDTree(xy).query(xy, k + 1, workers=-1), args.repeat)
        row["ckdtree_s"] = t
        # compare distances with cKDTree (its ties are in no set order; the point itself or a
        # duplicate of it comes first at 0), indices with the NumPy reference (ties by index)
        ref_d, ref_i = dist[:, 1:], None
        if n <= args.numpy_max:
            t, (idx, d) = timed(lambda xy=xy: knn2d(xy, k, method="grid"), args.repeat)
            row["numpy_s"] = t
            row["numpy_matches_ckdtree"] = bool(np.allclose(d, ref_d, rtol=1e-6, atol=0))
            ref_i = idx
            # cKDTree made exact (ties by index), the CPU dispatcher's choice on many cores
            t, (idx, d) = timed(lambda xy=xy: knn2d(xy, k, method="kdtree"), args.repeat)
            row["kdtree_exact_s"] = t
            row["kdtree_exact_matches_reference"] = bool(np.array_equal(idx, ref_i))
        if cp:
            xd = cp.asarray(xy)
            t, (idx, d) = timed(lambda xd=xd: knn2d(xd, k), args.gpu_repeat,
                                cp.cuda.Stream.null.synchronize)  # fmt: skip
            row["gpu_s"] = t
            if ref_i is not None:
                row["gpu_matches_reference"] = bool(np.array_equal(idx.get(), ref_i))
            else:
                row["gpu_matches_ckdtree"] = bool(np.allclose(d.get(), ref_d, rtol=1e-6, atol=0))
            del xd, idx, d
        for path in PATHS:
            if f"{path}_s" in row:
                row[f"{path}_speedup_vs_ckdtree"] = row["ckdtree_s"] / row[f"{path}_s"]
        rows.append(row)
        parts = [f"n={n:>9,}", f"cKDTree {row['ckdtree_s']:8.3f} s"]
        for path in PATHS:
            if f"{path}_s" in row:
                parts.append(
                    f"{path} {row[f'{path}_s']:8.4f} s (x{row[f'{path}_speedup_vs_ckdtree']:.2f})"
                )
        print("  ".join(parts), flush=True)

    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or RESULTS / f"overlap_kernel-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "overlap_kernel",
        "k": k,
        "data": args.data,
        "device": device,
        "gpu": bool(cp),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "speedup": "cKDTree seconds / path seconds (best of repeats)",
        "results": rows,
        "notes": notes,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    for note in notes:
        print(f"note: {note}")
    ok = all(
        v for r in rows for key, v in r.items() if key.endswith(("matches_ckdtree", "reference"))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
