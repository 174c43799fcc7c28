"""advlens' torch t-SNE engine vs openTSNE in the same run: a view of ``advlens bench tsne``.

``advlens bench tsne --engines torch,opentsne --knn own --no-baseline`` (``advlens.bench.
run_bench``) measures; this script picks its default sizes, chooses the device and writes the
comparison: per size, seconds for the kNN graph and for the rest (affinities and optimisation),
kNN recall@10 and trustworthiness of the map, final KL, and the ratios openTSNE / torch. Both
engines run the same schedule (n_iter total, early exaggeration 12 for ``--ee-iter`` with
momentum 0.5, then 0.8, learning rate n / 12, max_step_norm 5) from the same PCA start;
openTSNE builds its kNN as its users get it (``method="auto"``: Annoy above 1,000 points) and
picks its own gradient (BH below 10,000 points, FFT above). Data: ``--data auto`` is
Fashion-MNIST (train + test, PCA to 50) up to 70,000 points, the synthetic mixture above. JSON
goes to benchmarks/results/tsne_engine_<device>.json.

Usage::

    python benchmarks/tsne_engine.py                     # n = 10000 70000 on a GPU, 5000 on a CPU
    python benchmarks/tsne_engine.py --n 5000 --threads 2
    python benchmarks/tsne_engine.py --n 70000 --skip-opentsne --n-iter 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _choose_device(device: str) -> None:
    """One device for the whole process: the torch engine runs where ``auto`` resolves, so a
    given device is made the only one visible before torch loads."""
    if device == "auto":
        return
    if "torch" in sys.modules:
        raise SystemExit("--device must be chosen before torch is imported")
    index = device.partition(":")[2] or "0"
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else index


def summarise(result: dict[str, Any], skip_opentsne: bool) -> list[dict[str, Any]]:
    """The bench rows as one entry per size: ``torch``, ``opentsne`` and their ratios."""
    by_size: dict[int, dict[str, Any]] = {}
    for r in result["results"]:
        if r.get("status") != "ok":
            raise SystemExit(f"{r['engine']} at n={r['n']}: {r['status']}: {r.get('reason')}")
        params = r.get("params", {})
        entry = {
            "seconds_knn": r["seconds_knn"],
            "seconds_optimize": r["seconds_optimise"],
            "seconds_total": r["seconds_total"],
            "recall10": r["recall@10"],
            "trustworthiness": r["trustworthiness"],
            "kl": params.get("kl"),
            "repulsion": params.get("repulsion", "bh" if r["n"] < 10_000 else "fft"),
            "knn": params.get("knn"),
        }
        by_size.setdefault(r["n"], {"n": r["n"], "data": r["data"]})[r["engine"]] = entry
    runs = list(by_size.values())
    if not skip_opentsne:
        for row in runs:
            ours, ref = row["torch"], row["opentsne"]
            for part in ("total", "knn", "optimize"):
                a, b = ref[f"seconds_{part}"], ours[f"seconds_{part}"]
                row[f"speedup_{part}"] = a / b if a is not None and b else None
            row["recall_diff"] = ours["recall10"] - ref["recall10"]
    return runs


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--recall-sample", type=int, default=10_000,
                    help="query points for recall@10 and trustworthiness")  # fmt: skip
    ap.add_argument("--skip-opentsne", action="store_true")
    ap.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto",
                    help="auto: Fashion-MNIST up to 70,000 points (when present), synthetic above")  # fmt: skip
    ap.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/tsne_engine_<device>.json)"
    )
    args = ap.parse_args(argv)
    _choose_device(args.device)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `advlens bench`, before OpenMP loads

    from advlens._env import device_name, resolve_device
    from advlens._io import slug, write_json
    from advlens.bench import run_bench

    device = str(resolve_device())
    sizes = args.n or ([10_000, 70_000] if device.startswith("cuda") else [5000])
    if device.startswith("cuda"):  # warm-up, not recorded: CUDA context, cuFFT plans, allocator
        run_bench(engines=["torch"], sizes=[3000], data="synthetic", n_iter=30,
                  early_exaggeration_iter=10, sample=100, baseline=False)  # fmt: skip
    result = run_bench(
        engines=["torch"] + ([] if args.skip_opentsne else ["opentsne"]),
        sizes=sizes, data=args.data, knn="own", perplexity=args.perplexity,
        n_iter=args.n_iter, early_exaggeration_iter=args.ee_iter, seed=args.seed,
        n_jobs=args.threads, sample=args.recall_sample, baseline=False,
    )  # fmt: skip
    runs = summarise(result, args.skip_opentsne)
    for row in runs:
        ours = row["torch"]
        line = f"n={row['n']:>7}  torch {ours['seconds_total']:8.2f}s recall {ours['recall10']:.4f}"
        if "opentsne" in row:
            line += (
                f"  | openTSNE {row['opentsne']['seconds_total']:8.2f}s recall "
                f"{row['opentsne']['recall10']:.4f}  | speedup {row['speedup_total']:.2f}x"
            )
        print(line, flush=True)
    name = device_name(device)
    out = {
        "benchmark": "tsne_engine",
        "device": name,
        "device_type": device.split(":")[0],
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "versions": result["environment"]["versions"],
        "settings": {
            "n_iter": args.n_iter,
            "early_exaggeration_iter": args.ee_iter,
            "perplexity": args.perplexity,
            "seed": args.seed,
            "recall_sample": args.recall_sample,
            "data": args.data + " (per run: runs[i].data)",
        },
        "runs": runs,
        "environment": result["environment"],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = args.out or RESULTS / f"tsne_engine_{slug(name).replace('_', '-')}.json"
    write_json(path, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
