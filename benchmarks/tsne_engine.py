"""advlens' torch t-SNE engine vs openTSNE on Fashion-MNIST after PCA to 50, in the same run.

For each size: seconds for the affinities (kNN + calibrated P) and for the optimisation, kNN
recall@10 of the map, final KL, and the ratios torch / openTSNE. Both engines run the same
schedule (n_iter total, early exaggeration 12 for 250 with momentum 0.5, then 0.8, learning
rate n / 12, max_step_norm 5) from the same PCA start; openTSNE builds its kNN as its users get
it (``method="auto"``: Annoy above 1,000 points) and picks its own gradient (BH below 10,000
points, FFT above). JSON goes to benchmarks/results/ with the device name.

Usage::

    python benchmarks/tsne_engine.py                     # n = 10000 70000 on a GPU, 5000 on a CPU
    python benchmarks/tsne_engine.py --n 5000 --threads 2
    python benchmarks/tsne_engine.py --n 70000 --skip-opentsne --n-iter 1000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from advlens._env import device_name
from advlens.errors import AdvlensError

RESULTS = Path(__file__).resolve().parent / "results"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> np.ndarray:
    """All 70,000 images (train then test) as (70000, 784) float32 in [0, 1]."""
    try:
        from advlens.data import load_dataset

        parts = [load_dataset("fashion-mnist", split=s).images for s in ("train", "test")]
        return np.concatenate([p.reshape(len(p), -1) for p in parts]).astype(np.float32)
    except ImportError:
        names = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
        parts = [_read_idx(FMNIST / f) for f in names]
        return np.concatenate([p.reshape(len(p), -1) for p in parts]).astype(np.float32) / 255


def pca50(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    if n > len(images):  # never cut silently: the caller picks synthetic data instead
        raise ValueError(f"pca50: {n} points asked, the images have {len(images)}")
    rows = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    pca = PCA(50, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(images[rows]).astype(np.float32)


def points(n: int, data: str, seed: int, images) -> tuple[np.ndarray, str]:
    """(x (n, 50), what it is): Fashion-MNIST after PCA to 50, or the synthetic mixture of
    ``advlens.bench.synthetic_clusters`` (``auto``: where n exceeds the 70,000 images or they
    are not on this machine). The returned x always has exactly n rows."""
    from advlens.bench import synthetic_clusters

    if data == "fashion-mnist" or (data == "auto" and images is not None and n <= len(images)):
        if images is None or n > len(images):
            have = 0 if images is None else len(images)
            raise SystemExit(f"--data fashion-mnist: {n} points asked, {have} images here")
        return pca50(images, n, seed), "fashion-mnist train+test, seeded subset, PCA 50"
    return synthetic_clusters(n, seed=seed)[0], "synthetic: 10 Gaussian clusters in 50-D"


def run_torch(x: np.ndarray, args, device: str) -> dict:
    import torch

    from advlens.embed import recall_at_k
    from advlens.kernels import tsne as T

    xt = torch.tensor(x, device=device)
    res = T.tsne(
        xt,
        perplexity=args.perplexity,
        seed=args.seed,
        n_iter=args.n_iter,
        early_exaggeration_iter=args.ee_iter,
        learning_rate=len(x) / 12,
        compile=args.compile,
    )
    xy = res.y.cpu().numpy()
    return {
        "seconds_affinities": res.seconds_knn + res.seconds_affinities,
        "seconds_knn": res.seconds_knn,
        "seconds_optimize": res.seconds_optimize,
        "seconds_total": res.seconds_knn + res.seconds_affinities + res.seconds_optimize,
        "recall10": recall_at_k(x, xy, k=10, sample=args.recall_sample, seed=args.seed),
        "kl": res.kl[-1][1],
        "repulsion": res.method,
        "knn": res.knn,
    }


def run_opentsne(x: np.ndarray, args) -> dict:
    from openTSNE import TSNEEmbedding, affinity

    from advlens.embed import TSNEParams, _common, recall_at_k

    n = len(x)
    t0 = time.perf_counter()
    aff = affinity.PerplexityBasedNN(
        x, perplexity=args.perplexity, method="auto", n_jobs=args.threads, random_state=args.seed
    )
    t1 = time.perf_counter()
    init = _common.initial_positions(x, TSNEParams(seed=args.seed))
    emb = TSNEEmbedding(
        init, aff, negative_gradient_method="auto", learning_rate=n / 12, n_jobs=args.threads,
        random_state=args.seed, max_grad_norm=None, max_step_norm=5,
    )  # fmt: skip
    emb = emb.optimize(n_iter=args.ee_iter, exaggeration=12, momentum=0.5)
    emb = emb.optimize(n_iter=args.n_iter - args.ee_iter, exaggeration=1.0, momentum=0.8)
    t2 = time.perf_counter()
    return {
        "seconds_affinities": t1 - t0,
        "seconds_optimize": t2 - t1,
        "seconds_total": t2 - t0,
        "recall10": recall_at_k(
            x, np.asarray(emb), k=10, sample=args.recall_sample, seed=args.seed
        ),
        "kl": float(emb.kl_divergence),
        "repulsion": "bh" if n < 10_000 else "fft",
    }


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--n", type=int, nargs="+", help="sizes (default 10000 70000 on a GPU, 5000 on a CPU)"
    )
    ap.add_argument("--n-iter", type=int, default=1000, help="total iterations (default 1000)")
    ap.add_argument("--ee-iter", type=int, default=250, help="early exaggeration iterations")
    ap.add_argument("--perplexity", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, both engines"
    )
    ap.add_argument("--recall-sample", type=int, default=10_000, help="query points for recall@10")
    ap.add_argument("--skip-opentsne", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fused pieces")
    ap.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto",
                    help="auto: Fashion-MNIST up to 70,000 points (when present), synthetic above")  # fmt: skip
    ap.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/tsne_engine_<device>.json)"
    )
    args = ap.parse_args(argv)

    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    sizes = args.n or ([10_000, 70_000] if device.startswith("cuda") else [5000])
    torch.set_num_threads(args.threads)
    name = device_name(device)
    try:
        images = None if args.data == "synthetic" else load_fashion_mnist()
    except (OSError, ValueError, AdvlensError) as exc:  # no dataset on this machine
        if args.data == "fashion-mnist":
            raise
        print(f"Fashion-MNIST not available ({exc}); using synthetic data")
        images = None
    if device.startswith("cuda"):  # warm-up: CUDA context, cuFFT plans, allocator
        from advlens.kernels import tsne as T

        T.tsne(
            torch.tensor(points(3000, args.data, 1, images)[0], device=device),
            n_iter=30,
            early_exaggeration_iter=10,
        )

    runs = []
    for n in sizes:
        x, what = points(n, args.data, args.seed, images)
        row: dict = {"n": len(x), "data": what, "torch": run_torch(x, args, device)}
        if not args.skip_opentsne:
            row["opentsne"] = run_opentsne(x, args)
            ours, ref = row["torch"], row["opentsne"]
            row["speedup_total"] = ref["seconds_total"] / ours["seconds_total"]
            row["speedup_affinities"] = ref["seconds_affinities"] / ours["seconds_affinities"]
            row["speedup_optimize"] = ref["seconds_optimize"] / ours["seconds_optimize"]
            row["recall_diff"] = ours["recall10"] - ref["recall10"]
        runs.append(row)
        line = f"n={n:>7}  torch {row['torch']['seconds_total']:8.2f}s recall {row['torch']['recall10']:.4f}"
        if "opentsne" in row:
            line += (
                f"  | openTSNE {row['opentsne']['seconds_total']:8.2f}s recall "
                f"{row['opentsne']['recall10']:.4f}  | speedup {row['speedup_total']:.2f}x"
            )
        print(line, flush=True)

    import openTSNE

    import advlens

    out = {
        "benchmark": "tsne_engine",
        "device": name,
        "device_type": device.split(":")[0],
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "versions": {
            "advlens": advlens.__version__,
            "torch": torch.__version__,
            "openTSNE": openTSNE.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "n_iter": args.n_iter,
            "early_exaggeration_iter": args.ee_iter,
            "perplexity": args.perplexity,
            "seed": args.seed,
            "recall_sample": args.recall_sample,
            "data": args.data + " (per run: runs[i].data)",
        },
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.out or RESULTS / f"tsne_engine_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
