"""Benchmark t-SNE engines on equal terms: same data, same parameters, same kNN graph.

Per engine and size: seconds (kNN graph and optimisation apart), kNN recall@10 and
trustworthiness on a sample of points, and, with --overlap-store, the overlap value of a real
layer's clean and perturbed activations. Engines that are not installed are listed as skipped.
A plain openTSNE run with its own defaults (--baseline, on by default) is measured in the same
run as the yardstick; published figures are shown beside, labelled as not measured here.
Writes FILE.json, FILE.md (table) and FILE.png (plot).

Data: auto (default: Fashion-MNIST up to 70,000 points, the synthetic mixture for larger sizes),
fashion-mnist (train + test images, 70,000, PCA to 50), synthetic (a seeded mixture of 10
Gaussian clusters in 50-D, any size: `synthetic_clusters`) or store:PATH:LAYER (a layer's joint
activations from a run's store). A size is never cut to what the data holds: a size beyond it
is an error (or, with auto, synthetic); every row records its n and its data.

Examples:
  advlens bench tsne --engines sklearn,opentsne --n 10000 --out benchmarks/results/tsne.json
  advlens bench tsne --engines sklearn,opentsne,cuml,torch --n 10000,70000 --out tsne.json
  advlens bench tsne --engines torch,cuml --n 70000,250000,1000000 --out big.json   # > 70,000: synthetic
  advlens bench tsne --n 2000 --data store:runs/default/apgd-ce-linf.zarr:fc1 --out s.json
  advlens bench tsne --n 10000 --overlap-store runs/default/apgd-ce-l2.zarr --out o.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from openTSNE import TSNE

from advlens._env import cpu_name, device_name, has_cuda, versions
from advlens._io import atomic_write, write_json
from advlens._optional import MissingDependency, has
from advlens.data import load_dataset
from advlens.embed import (
    TSNEParams,
    embed,
    get_engine,
    knn_graph,
    list_engines,
    recall_at_k,
    trustworthiness,
)
from advlens.errors import ConfigError, DataError, closest
from advlens.overlap import overlap
from advlens.reduce import reduce
from advlens.report.bench_figures import tsne_bench_figure
from advlens.store import ActivationStore

log = logging.getLogger(__name__)

BASELINE = "opentsne-default"
REFERENCE = {
    "label": "published reference figures - NOT measured in this run (other machines)",
    "source": "advlens issue 7; Fashion-MNIST train+test after PCA to 50",
    "rows": [
        {"machine": "H200 node, 16 CPU cores", "engine": "opentsne", "n": 10000, "seconds": 38.0,
         "recall@10": 0.48},
        {"machine": "H200 node, 16 CPU cores", "engine": "opentsne", "n": 70000, "seconds": 84.0,
         "recall@10": 0.39},
        {"machine": "2-core machine", "engine": "opentsne", "n": 10000, "seconds": 37.0,
         "recall@10": 0.48},
        {"machine": "2-core machine", "engine": "sklearn", "n": 10000, "seconds": 37.0,
         "recall@10": 0.48},
    ],
}  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    p = sub.add_parser(
        "tsne",
        help="t-SNE engines: time, kNN recall, trustworthiness, overlap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after `tsne`; SUPPRESS keeps `advlens bench --quiet tsne` working too.
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="log lines instead of progress bars")  # fmt: skip
    p.add_argument("--engines", default="sklearn,opentsne,cuml,torch", help="comma list")
    p.add_argument("--n", default="10000,70000", help="sizes, comma list (default 10000,70000)")
    p.add_argument(
        "--data",
        default="auto",
        help="auto|fashion-mnist|synthetic|store:PATH:LAYER (auto: Fashion-MNIST up to 70,000 "
        "points, synthetic above)",
    )
    p.add_argument("--overlap-store", default=None, metavar="PATH", help="store for the overlap")
    p.add_argument("--overlap-layer", default=None, help="layer of --overlap-store (default: last)")
    p.add_argument("--knn", choices=("shared", "own"), default="shared",
                   help="shared: one exact kNN graph for every engine that takes one (default); "
                        "own: each engine searches itself")  # fmt: skip
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--n-iter", type=int, default=1000, help="total iterations (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=-1, help="CPU threads (-1: all)")
    p.add_argument("--sample", type=int, default=1000, help="points scored for recall/trust")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also time plain openTSNE with its defaults ({BASELINE})")  # fmt: skip
    p.add_argument("--out", default="bench-tsne.json", metavar="FILE.json",
                   help="JSON; .md and .png beside (default: bench-tsne.json here)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed machine,
    # spinning threads slow Barnes-Hut t-SNE tenfold. Read once, when the OpenMP runtime first
    # loads (nothing has loaded it yet in this process); recorded in the JSON.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = run_bench(
        engines=_split(args.engines),
        sizes=[_int(v, "--n") for v in _split(args.n)],
        data=args.data,
        overlap_store=args.overlap_store,
        overlap_layer=args.overlap_layer,
        knn=args.knn,
        perplexity=args.perplexity,
        n_iter=args.n_iter,
        seed=args.seed,
        n_jobs=args.n_jobs,
        sample=args.sample,
        baseline=args.baseline,
    )
    paths = write_outputs(result, args.out)
    print(render_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _split(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def _int(text: str, flag: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not an integer, e.g. --n 1000,10000") from None


# --------------------------------------------------------------------------------- data


def synthetic_clusters(
    n: int, d: int = 50, n_clusters: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian mixture in ``d``-D with known clusters, any ``n``: (x (n, d) float32, labels).

    Centres N(0, 4^2 I); each point is its centre plus noise whose standard deviation along
    axis j is 3 / sqrt(1 + j), a falling spectrum like that of PCA-reduced activations.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_clusters, d)).astype(np.float32)
    labels = np.arange(n) % n_clusters
    scale = (3.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= scale
    x += centres[labels]
    return x, labels


FMNIST_POINTS = 70_000  # Fashion-MNIST train + test


def data_for_size(spec: str, n: int) -> str:
    """The data a size runs on: ``auto`` is Fashion-MNIST up to its 70,000 images, then the
    synthetic mixture; any other spec is itself."""
    if spec != "auto":
        return spec
    return "synthetic" if n > FMNIST_POINTS else "fashion-mnist"


def load_points(spec: str, seed: int = 0, n: int = 20_000) -> tuple[np.ndarray, str]:
    """The benchmark points (m, <=50) float32 and a description of where they came from.

    ``synthetic`` makes exactly ``n`` points; the other sources have the size they have."""

    if spec == "fashion-mnist":
        parts = [load_dataset("fashion-mnist", split=s) for s in ("train", "test")]
        x = np.concatenate([p.images.reshape(len(p.images), -1) for p in parts])
        return reduce(x, 50, seed=seed), f"Fashion-MNIST train+test ({len(x)}), PCA to 50"
    if spec == "synthetic":
        x, _ = synthetic_clusters(n, seed=seed)
        return x, f"10 Gaussian clusters in 50-D ({n:,} points, decaying spectrum)"
    if spec.startswith("store:"):
        path, sep, layer = spec[len("store:") :].rpartition(":")
        if not sep or not path or not layer:
            raise ConfigError(f"--data {spec!r}: expected store:PATH:LAYER")
        store = _open_store(path)
        _check_layer(store, layer, "--data")
        return reduce(store.joint(layer), 50, seed=seed), f"store {path}, layer {layer}, PCA to 50"
    raise ConfigError(
        f"--data {spec!r}: {closest(spec, ['fashion-mnist', 'synthetic', 'store:PATH:LAYER'])}"
    )


def _open_store(path: str):
    if not Path(path).exists():
        raise DataError(f"store {path!r} does not exist; run `advlens run` first or fix the path")
    return ActivationStore.open(path)


def _check_layer(store, layer: str, flag: str) -> None:
    if layer not in store.layers:
        raise ConfigError(
            f"{flag}: layer {layer!r} is not in the store; {closest(layer, store.layers)}"
        )


# ---------------------------------------------------------------------------- measuring


def run_bench(
    *,
    engines: list[str],
    sizes: list[int],
    data: str = "fashion-mnist",
    overlap_store: str | None = None,
    overlap_layer: str | None = None,
    knn: str = "shared",
    perplexity: float = 30.0,
    n_iter: int = 1000,
    early_exaggeration_iter: int = 250,
    seed: int = 0,
    n_jobs: int = -1,
    sample: int = 1000,
    baseline: bool = True,
) -> dict[str, Any]:
    """Measure every engine at every size; returns the JSON-ready result
    (``benchmarks/tsne_engine.py`` is a view of it: torch against openTSNE)."""

    for name in engines:
        if name not in list_engines():
            raise ConfigError(
                f"--engines: unknown engine {name!r}; {closest(name, list_engines())}"
            )
    if not sizes or min(sizes) < 10:
        raise ConfigError(f"--n {sizes}: give sizes of at least 10 points")
    params = TSNEParams(perplexity=perplexity, n_iter=n_iter, seed=seed, n_jobs=n_jobs,
                        early_exaggeration_iter=early_exaggeration_iter)  # fmt: skip
    env = environment()
    rows: list[dict[str, Any]] = []
    descriptions: list[str] = []
    for source in dict.fromkeys(data_for_size(data, n) for n in sizes):
        own = [n for n in sizes if data_for_size(data, n) == source]
        points, description = load_points(source, seed, n=max(own))
        if max(own) > len(points):  # never cut a size to what the data holds
            raise ConfigError(
                f"--n {max(own)}: --data {source} has only {len(points)} points; use "
                "--data synthetic (any size) or --data auto"
            )
        descriptions.append(description)
        order = np.random.default_rng(seed).permutation(len(points))  # nested subsets
        for n in own:
            x = np.ascontiguousarray(points[np.sort(order[:n])])
            for row in _bench_size(x, engines, params, knn, sample, baseline):
                rows.append(row | {"data": description})
    overlap = None
    if overlap_store:
        overlap = _bench_overlap(overlap_store, overlap_layer, engines, params, baseline)
    env["loadavg_end"] = _loadavg()
    return {
        "benchmark": "tsne-engines",
        "data": "; ".join(descriptions),
        "params": params.to_dict() | {"learning_rate_resolved": "N / early_exaggeration"},
        "knn": knn,
        "sample": sample,
        "environment": env,
        "results": rows,
        "overlap": overlap,
        "reference": REFERENCE,
    }


def _bench_size(x, engines, params, knn_mode, sample, baseline) -> list[dict[str, Any]]:
    n = len(x)
    graph, knn_s = None, None
    if knn_mode == "shared":
        t = time.perf_counter()
        graph = knn_graph(x, perplexity=params.perplexity, n_jobs=params.n_jobs)
        knn_s = time.perf_counter() - t
        log.info("n=%d: shared exact kNN graph in %.1f s", n, knn_s)
    rows = []
    for name in engines:
        row: dict[str, Any] = {"engine": name, "n": n}
        status, emb = _run_engine(name, x, params, graph)
        row.update(status)
        if emb is not None:
            own_knn = emb.knn_seconds if graph is None or emb.knn_seconds is None else knn_s
            opt = emb.seconds - (emb.knn_seconds or 0.0)
            row.update(_timing(own_knn, opt))
            row.update(_quality(x, emb.xy, sample, params.seed))
            row["params"] = emb.params
            row["engine_resolved"] = emb.engine
        rows.append(row)
        log.info("n=%d %s: %s", n, name, {k: v for k, v in row.items() if k != "params"})
    if baseline:
        rows.append(_baseline(x, params, sample))
    base = next((r for r in rows if r["engine"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        if base and r.get("seconds_total"):
            r["time_vs_baseline"] = r["seconds_total"] / base["seconds_total"]
    return rows


def _run_engine(name, x, params, graph):
    """(status fields, Embedding or None): skipped when the engine is not installed."""

    try:
        mod = get_engine(name)
        if not mod.available():
            return {"status": "skipped", "reason": f"{mod.NAME}: library or GPU not present"}, None
        return {"status": "ok"}, embed(x, engine=name, params=params, knn=graph)
    except MissingDependency as exc:
        return {"status": "skipped", "reason": str(exc)}, None
    except ConfigError as exc:
        if "not part of this advlens installation" in str(exc):
            return {"status": "skipped", "reason": str(exc)}, None
        return {"status": "failed", "reason": str(exc)}, None
    except Exception as exc:  # one engine failing must not lose the others' numbers
        log.exception("engine %s failed", name)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}, None


def _timing(knn_s: float | None, opt_s: float) -> dict[str, Any]:
    total = opt_s + (knn_s or 0.0)
    return {"seconds_knn": knn_s, "seconds_optimise": opt_s, "seconds_total": total}


def _quality(x, xy, sample: int, seed: int) -> dict[str, float]:
    return {
        "recall@10": recall_at_k(x, xy, k=10, sample=sample, seed=seed),
        "trustworthiness": trustworthiness(x, xy, k=10, sample=sample, seed=seed),
    }


def _plain_opentsne(x, params):
    return np.asarray(TSNE(n_jobs=params.n_jobs, random_state=params.seed).fit(x), np.float32)


def _baseline(x, params, sample) -> dict[str, Any]:
    """openTSNE exactly as a user would call it: its own kNN (Annoy), its own schedule."""

    row: dict[str, Any] = {"engine": BASELINE, "n": len(x)}
    if not has("openTSNE"):
        return row | {"status": "skipped", "reason": "openTSNE is not installed"}
    t = time.perf_counter()
    xy = _plain_opentsne(x, params)
    row |= {"status": "ok"} | _timing(None, time.perf_counter() - t)
    row |= _quality(x, xy, sample, params.seed)
    row["params"] = {"openTSNE.TSNE": "defaults", "n_jobs": params.n_jobs, "seed": params.seed}
    return row


def _bench_overlap(path, layer, engines, params, baseline) -> dict[str, Any]:
    store = _open_store(path)
    layer = layer or store.layers[-1]
    _check_layer(store, layer, "--overlap-layer")
    x = reduce(store.joint(layer), 50, seed=params.seed)
    is_perturbed = np.repeat([False, True], store.n)
    graph = knn_graph(x, perplexity=params.perplexity, n_jobs=params.n_jobs)
    values: dict[str, Any] = {}
    for name in engines:
        status, emb = _run_engine(name, x, params, graph)
        if emb is not None:
            status["overlap"] = overlap(emb.xy, is_perturbed, k=10).value
            status["seconds"] = emb.seconds
        values[name] = status
    if baseline:
        values[BASELINE] = {"status": "ok", "overlap": overlap(_plain_opentsne(x, params),
                                                               is_perturbed, k=10).value}  # fmt: skip
    return {"store": str(path), "layer": layer, "n_points": len(x), "k": 10, "engines": values}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Device, CPU count, load and library versions, for the record."""

    libs = versions("advlens", "numpy", "scipy", "scikit-learn", "openTSNE", "torch",
                    "threadpoolctl", "cuml-cu12", "cuml-cu13", "cupy-cuda12x", "cupy-cuda13x")  # fmt: skip
    cpu = cpu_name()
    gpu = device_name("cuda:0") if has_cuda() else None
    return {
        "device": f"GPU {gpu} + CPU {cpu}" if gpu else f"CPU {cpu}",
        "cpu_model": cpu,
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": _loadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": libs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------ outputs


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """FILE.json, FILE.md and FILE.png."""

    out = Path(out)
    if out.suffix != ".json":
        out = out.with_suffix(".json")
    md_path, png_path = out.with_suffix(".md"), out.with_suffix(".png")
    write_json(out, result)
    atomic_write(md_path, render_markdown(result).encode())
    tsne_bench_figure(result, png_path)
    return [out, md_path, png_path]


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# t-SNE engine benchmark",
        "",
        f"- data: {result['data']}; kNN graph: {result['knn']}; quality scored on "
        f"{result['sample']} sampled points",
        f"- params: {result['params']}",
        f"- device: {env['device']}; CPUs: {env['cpu_count']} (usable {env['cpus_usable']}); "
        f"load average start {env['loadavg_start']} end {env.get('loadavg_end')}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}",
        "",
        "## Measured in this run",
        "",
        "| engine | n | status | kNN s | optimise s | total s | vs openTSNE defaults "
        "| recall@10 | trustworthiness |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines.append(
            f"| {r['engine']} | {r['n']} | {status} | {_fmt(r.get('seconds_knn'), 1)} "
            f"| {_fmt(r.get('seconds_optimise'), 1)} | {_fmt(r.get('seconds_total'), 1)} "
            f"| {_fmt(r.get('time_vs_baseline'), 2)} | {_fmt(r.get('recall@10'))} "
            f"| {_fmt(r.get('trustworthiness'))} |"
        )
    ov = result.get("overlap")
    if ov:
        lines += ["", f"## Overlap (k = {ov['k']}) on layer {ov['layer']} of {ov['store']} "
                  f"({ov['n_points']} points)", "", "| engine | overlap | status |", "|---|---:|---|"]  # fmt: skip
        for name, v in ov["engines"].items():
            lines.append(
                f"| {name} | {_fmt(v.get('overlap'))} | {v['status']} {v.get('reason', '')} |"
            )
    ref = result["reference"]
    lines += ["", f"## Reference: {ref['label']}", "", f"Source: {ref['source']}.", "",
              "| machine | engine | n | seconds | recall@10 |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in ref["rows"]:
        lines.append(
            f"| {r['machine']} | {r['engine']} | {r['n']} | {r['seconds']:.0f} | {r['recall@10']:.2f} |"
        )
    return "\n".join(lines) + "\n"
