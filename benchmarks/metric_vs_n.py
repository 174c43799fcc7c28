"""Does the layer value mean the same at every sample size? Raw fixed-k overlap against the new
default (calibrated overlap with k = "auto") at N = 250, 500, 1,000, 2,000 on the default model.

One store of 2,000 attacked images (default model, APGD-CE, one norm; cached in
runs/bench-metric-vs-n/), nested subsets of it (the first N of a seeded permutation of the 2,000
samples, several permutations), each subset reduced (PCA 50) and embedded (openTSNE) on its own,
as a run with data.n = N would be. Per layer and N: the mean over draws of the raw overlap at
k = 10, the raw and the calibrated overlap at the auto k, and the 50-D values (the artefact
check's spread). Target, for every layer below the input: spread across N (max - min of the
per-N means) of the new default <= 1/3 of the fixed-k = 10 spread, and <= 0.08.

Usage:
    python benchmarks/metric_vs_n.py                  # linf 0.1, 3 draws, 500 t-SNE iterations
    python benchmarks/metric_vs_n.py --norm l2 --draws 2 --n-iter 750
    python benchmarks/metric_vs_n.py --perplexity-per-sample 0.03 --layers conv2,fc1

Runtime on 2 cores: the attack (once, cached) plus 7 layers x (3 x 250 + 3 x 500 + 3 x 1,000 +
1 x 2,000 samples) of t-SNE, 295 s in all (measured); fewer t-SNE iterations than the default
1,000 keep it to minutes. The maps are cached beside the store, so a rerun only rescores.
Writes benchmarks/results/metric_vs_n-<device>[-pps<F>].json; exits 0 (the target's outcome
is in the JSON and the last line printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np

from advlens._env import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (250, 500, 1000, 2000)
FIXED = "overlap_k10"  # the old default: raw overlap at k = 10
VARIANTS = ("overlap", "mixing", "share")


def default_columns() -> tuple[str, str, str]:
    """(the config default's column, its map column, its 50-D column): calibrated, k = "auto",
    in the configured space."""
    from advlens.config import OverlapConfig

    ov = OverlapConfig()
    space = getattr(ov, "space", "map")
    cols = f"{ov.variant}_auto_cal", f"{ov.variant}_50d_auto_cal"
    return (cols[1] if space == "reduced" else cols[0], *cols)


def build_store(norm: str, n: int, root: str):
    """The 2,000-sample store of the default model (attacked once, then read from cache)."""
    from advlens.config import load
    from advlens.models import fingerprint
    from advlens.run import _attack_and_extract, _layer_plan, _model_and_data, _pick_samples
    from advlens.store import ActivationStore

    cfg = load(None, [f"data.n={n}", f'attack.norms=["{norm}"]', f'output.root="{root}"',
                      'output.name="bench-metric-vs-n"'])  # fmt: skip
    model, data, device = _model_and_data(cfg)
    layers, _, widths, aliases = _layer_plan(cfg, model, tuple(data.images.shape[1:]))
    samples, _ = _pick_samples(cfg, model, data, device)
    name = cfg.attack.attack_names[0]
    eps = cfg.attack.eps_for(norm, data.name)
    path = _attack_and_extract(cfg, model, samples, name, norm, eps, layers, widths, device,
                               False, fingerprint(cfg.model, model), aliases)  # fmt: skip
    return cfg, ActivationStore.open(path), [x for x in layers if x not in aliases], eps


def score(x50: np.ndarray, xy: np.ndarray, n: int) -> dict[str, float]:
    """Per variant (overlap, mixing, share): the raw value at k = 10 and at the auto k and the
    calibrated ones, on the map and on the 50-D points (``<v>[_50d]_<k10|auto>[_cal]``)."""
    from advlens.kernels.metrics import auto_k
    from advlens.overlap import overlap_highdim_sweep, overlap_sweep

    flags = np.repeat([False, True], n)
    k = auto_k(n)
    ks = tuple(sorted({10, k}))
    out: dict[str, float] = {"k_auto": k}
    for space, sweep, pts in (("", overlap_sweep, xy), ("_50d", overlap_highdim_sweep, x50)):
        sw = sweep(pts, flags, ks=ks, variants=VARIANTS)
        for v in VARIANTS:
            for tag, q in (("k10", 10), ("auto", k)):
                out[f"{v}{space}_{tag}"] = sw[(v, q)].value
                out[f"{v}{space}_{tag}_cal"] = sw[(v, q)].calibrated
    return out


def maps(layer, joint, n_store, perms, params, pca_dims, cache, per_sample=None):
    """{(N, draw): (x50, xy)} for one layer, cached in ``cache`` (a rerun only rescores);
    ``per_sample``: perplexity = per_sample x N instead of the config's."""
    from dataclasses import replace

    from advlens.embed import embed
    from advlens.reduce import reduce

    tag = f"-pps{per_sample:g}" if per_sample else ""
    path = cache / f"{layer.replace('/', '_')}-it{params.n_iter}-d{len(perms)}{tag}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {tuple(int(p) for p in key.split("_")[1:]): (z[key], z["xy" + key[3:]])
                    for key in z.files if key.startswith("x50")}  # fmt: skip
    out = {}
    for n in SIZES:
        for d, perm in enumerate(perms if n < n_store else perms[:1]):
            pick = np.sort(perm[:n])
            x = joint[np.concatenate([pick, pick + n_store])]
            x50 = reduce(x, pca_dims, seed=0, device="cpu")
            p = replace(params, perplexity=max(5.0, per_sample * n)) if per_sample else params
            out[(n, d)] = (x50, embed(x50, engine="opentsne", params=p).xy)
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for (n, d), (x50, xy) in out.items():
        arrays[f"x50_{n}_{d}"], arrays[f"xy_{n}_{d}"] = x50, xy
    np.savez(path, **arrays)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--norm", default="linf", choices=("l2", "linf"))
    ap.add_argument("--draws", type=int, default=3, help="subset draws per N < max N")
    ap.add_argument("--n-iter", type=int, default=500, help="t-SNE iterations (default 1,000)")
    ap.add_argument("--root", default="runs", help="where the cached store goes")
    ap.add_argument(
        "--perplexity-per-sample",
        type=float,
        default=None,
        help="t-SNE perplexity = this x N (an experiment; default: the config's 30)",
    )
    ap.add_argument("--layers", default=None, help="comma list of layers (default: all)")
    args = ap.parse_args(argv)

    from advlens.embed import TSNEParams

    t_start = time.perf_counter()
    cfg, store, layers, eps = build_store(args.norm, max(SIZES), args.root)
    t_store = time.perf_counter() - t_start
    params = TSNEParams.from_config(cfg.embed, n_iter=args.n_iter, seed=0)
    rng = np.random.default_rng(0)
    perms = [rng.permutation(store.n) for _ in range(args.draws)]
    cache = Path(args.root) / "bench-metric-vs-n" / "maps"
    default, on_map, on_50d = default_columns()
    out_layers = {}
    if args.layers:
        layers = [x for x in layers if x in args.layers.split(",")]
    for layer in layers:
        joint = store.joint(layer).astype(np.float32)
        per_n: dict[int, list[dict]] = {}
        for (n, d), (x50, xy) in sorted(
            maps(
                layer,
                joint,
                store.n,
                perms,
                params,
                cfg.embed.pca_dims,
                cache,
                args.perplexity_per_sample,
            ).items()  # fmt: skip
        ):
            per_n.setdefault(n, []).append(score(x50, xy, n) | {"draw": d})
        means = {n: {m: float(np.mean([r[m] for r in rs])) for m in rs[0] if m != "draw"}
                 for n, rs in per_n.items()}  # fmt: skip
        spread = {m: max(v[m] for v in means.values()) - min(v[m] for v in means.values())
                  for m in means[SIZES[0]] if m != "k_auto"}  # fmt: skip
        gaps = [r[on_map] - r[on_50d] for rs in per_n.values() for r in rs]
        ok = spread[default] <= spread[FIXED] / 3 + 1e-12 and spread[default] <= 0.08
        out_layers[layer] = {"per_n": {str(n): rs for n, rs in per_n.items()},
                             "mean_per_n": {str(n): v for n, v in means.items()},
                             "spread": spread, "artefact_gap_mean": float(np.mean(gaps)),
                             "artefact_gap_sd": float(np.std(gaps, ddof=1)),
                             "meets_target": bool(ok) if layer != "input" else None}  # fmt: skip
        row = " ".join(f"{means[n][FIXED]:.3f}/{means[n][default]:.3f}" for n in SIZES)
        others = " ".join(f"{m} {spread[m]:.3f}" for m in spread if m.endswith("_cal"))
        print(f"{layer:>8}: fixed/default per N {row}  spread {spread[FIXED]:.3f} -> "
              f"{spread[default]:.3f} {'ok' if ok else 'MISS'} | {others}", flush=True)  # fmt: skip
    deep = [v for k, v in out_layers.items() if k != "input"]
    device = cpu_name()
    doc = {
        "benchmark": "metric_vs_n",
        "device": device,
        "platform": platform.platform(),
        "norm": args.norm,
        "eps": eps,
        "sizes": list(SIZES),
        "draws": args.draws,
        "tsne_n_iter": args.n_iter,
        "perplexity": (
            f"{args.perplexity_per_sample:g} x N"
            if args.perplexity_per_sample
            else cfg.embed.perplexity
        ),  # fmt: skip
        "k_rule": "auto: max(1, round(N / 100))",
        "default": default,
        "artefact_gap": f"{on_map} - {on_50d}",
        "target": "spread(default) <= spread(raw k=10) / 3 and <= 0.08, every layer but input",
        "meets_target": all(v["meets_target"] for v in deep),
        "seconds_store": t_store,
        "seconds_total": time.perf_counter() - t_start,
        "layers": out_layers,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40]
    tag = f"-pps{args.perplexity_per_sample:g}" if args.perplexity_per_sample else ""
    path = RESULTS / f"metric_vs_n-{slug}{tag}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"meets target: {doc['meets_target']}  ({doc['seconds_total']:.0f} s); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
