"""Compare finished runs: one per-layer curve figure and one table over several runs.

Each run folder (``runs/<name>``, holding metrics.json) adds one line per attack x norm:
L2 blue, Linf orange; runs differ by line style and marker, and by shade too when every line
has the same norm (an eps sweep). Layers are matched by name: runs that share layer names
share the layer-name axis; runs of different models (no common name) are drawn against
relative depth (layer position / last layer). Bands: spread over repeats, or with one map
per layer its bootstrap interval. A warning names every setting (N, k, eps) in which the runs
differ. Writes ``compare.png`` and ``compare.csv`` (mean, std and bootstrap interval over
repeats, the per-map interval ci_low/ci_high, N and k) to --out.

Examples:
  advlens compare runs/small-cnn runs/wrn-28-10
  advlens compare runs/eps-0.05 runs/eps-0.1 runs/eps-0.2 --out runs/eps-sweep
  advlens compare runs/a runs/b --metric auc
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from advlens._io import slug
from advlens.errors import ConfigError, closest
from advlens.report import figures as F
from advlens.report.tables import METRICS, aggregate, read_metrics, write_csv

log = logging.getLogger(__name__)


def _names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) < len(names):  # same folder name under different roots
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]
    return names


def _shade(color: str, t: float) -> str:
    """Blend ``color`` towards white (t < 0) or black (t > 0)."""

    rgb = np.array(to_rgb(color))
    target = np.zeros(3) if t > 0 else np.ones(3)
    return to_hex(rgb + (target - rgb) * abs(t))


def compare(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, metric: str = "overlap"
) -> dict[str, Path]:
    """Write ``compare.png`` and ``compare.csv`` for ``run_dirs`` into ``out_dir``.

    Layers are matched by name; a warning is logged for every setting (N, k, eps) in which
    the runs differ, since their curves are then not measured on equal terms.
    """

    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not a metric; {closest(metric, METRICS)}")
    if len(run_dirs) < 1:
        raise ConfigError("advlens compare needs at least one run folder")
    paths = [Path(p) for p in run_dirs]
    names = _names(paths)
    runs = [(name, *read_metrics(p)) for name, p in zip(names, paths, strict=True)]
    for line in differences(runs):
        log.warning("compare: %s", line)
    # Runs that share layer names are drawn on one name axis (their union, in order); runs
    # with no layer in common (different models) against relative depth.
    axis = union_layers([r[2] for r in runs])
    by_name = bool(set.intersection(*(set(r[2]) for r in runs)))
    series, table = [], []
    norms = {a["norm"] for _, rows, layers in runs for a in aggregate(rows, layers)}
    for i, (name, rows, layers) in enumerate(runs):
        agg = aggregate(rows, layers)
        for s in F.agg_series(agg, axis if by_name else layers, metric):
            s.label = f"{name}: {s.label}" if len(runs) > 1 else s.label
            # Runs differ by line style and marker, and by shade when all share one norm.
            if len(runs) > 1:
                s.linestyle = F.LINESTYLES[i % len(F.LINESTYLES)]
                s.marker = F.MARKERS[i % len(F.MARKERS)]
            if len(norms) == 1 and len(runs) > 1:
                s.color = _shade(s.color, -0.55 + 0.85 * i / (len(runs) - 1))
            if s.lo is None:  # one map per layer: its bootstrap interval over points
                _map_band(s, agg, axis if by_name else layers, metric)
            s.extra["depth"] = np.arange(len(layers)) / max(len(layers) - 1, 1)
            series.append(s)
        for a in agg:
            depth = (
                a["layer_index"] / max(len(layers) - 1, 1) if a["layer_index"] is not None else None
            )
            table.append({
                "run": name, "attack": a["attack"], "norm": a["norm"], "eps": a["eps"],
                "layer": a["layer"], "layer_index": a["layer_index"], "depth": depth,
                "n": a["n"], "k": a["k"], "n_repeats": a["n_repeats"],
                **{f"{metric}_{s}": a[f"{metric}_{s}"]
                   for s in ("mean", "std", "boot_low", "boot_high")},
                "ci_low": a["ci_low"] if metric == "overlap" else None,
                "ci_high": a["ci_high"] if metric == "overlap" else None,
            })  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ylim = (0.4, 1.02) if metric == "auc" else (-0.02, 1.02)
    png = out_dir / "compare.png"
    if by_name:
        F.plot_series(series, axis, png, ylabel=metric, ylim=ylim)
    else:
        _depth_plot(series, png, ylabel=metric, ylim=ylim)
    csv = write_csv(out_dir / "compare.csv", table)
    return {"compare.png": png, "compare.csv": csv}


def union_layers(lists: Sequence[Sequence[str]]) -> list[str]:
    """Every layer name once, in order: each new name goes right after its predecessor."""
    out: list[str] = []
    for layers in lists:
        prev: str | None = None
        for name in layers:
            if name not in out:
                out.insert(out.index(prev) + 1 if prev in out else len(out), name)
            prev = name
    return out


def differences(runs: Sequence[tuple[str, list[dict], list[str]]]) -> list[str]:
    """One line per setting (N, k, eps per attack x norm) whose value differs between runs."""
    values: dict[str, dict[str, set]] = {}
    for name, rows, _ in runs:
        for r in rows:
            for what, v in (("N", r.get("n")), ("k", r.get("k")),
                            (f"eps ({r.get('attack')} {r.get('norm')})", r.get("eps"))):  # fmt: skip
                values.setdefault(what, {}).setdefault(name, set()).add(v)
    lines = []
    for what, per_run in values.items():
        if len(per_run) > 1 and len(set().union(*per_run.values())) > 1:
            shown = ", ".join(f"{name}={'/'.join(map(_num, sorted(vs, key=str)))}"
                              for name, vs in per_run.items())  # fmt: skip
            lines.append(f"runs differ in {what}: {shown}; their curves are not on equal terms")
    return lines


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _map_band(s, agg: Sequence[dict], layers: Sequence[str], metric: str) -> None:
    """Set the series band from the per-map bootstrap interval (overlap only)."""
    if metric != "overlap":
        return
    index = {name: i for i, name in enumerate(layers)}
    lo, hi = np.full(len(layers), np.nan), np.full(len(layers), np.nan)
    for a in agg:
        if (a["attack"], a["norm"]) == (s.extra.get("attack"), s.extra.get("norm")):
            if a["layer"] in index and a.get("ci_low") is not None:
                lo[index[a["layer"]]], hi[index[a["layer"]]] = a["ci_low"], a["ci_high"]
    if np.isfinite(lo).any():
        s.lo, s.hi = lo, hi


def _depth_plot(series, out: Path, *, ylabel: str, ylim) -> Path:
    """Lines against relative depth, for runs whose layers differ (different models)."""

    with F._rc():
        fig = Figure(figsize=(F.COLUMN_IN, 2.6), dpi=F.DPI, layout="constrained")
        ax = fig.add_subplot()
        for s in series:
            x = s.extra["depth"]
            ms = 2.5 if len(x) <= 30 else 1.2
            ax.plot(x, s.y, ls=s.linestyle, color=s.color, marker=s.marker, ms=ms, lw=1.2,
                    label=s.label)  # fmt: skip
            if s.lo is not None:
                ax.fill_between(x, np.clip(s.lo, *ylim), np.clip(s.hi, *ylim), color=s.color,
                                alpha=0.2, lw=0)  # fmt: skip
        ax.set_ylim(*ylim)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("relative depth (layer position / last layer)")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", lw=0.3, alpha=0.6)
        ax.legend(frameon=False, fontsize=5.5, loc="best")
        return F.save(fig, out)


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """``<parent of the first run>/compare-<a>-vs-<b>...`` (shortened)."""

    paths = [Path(p) for p in run_dirs]
    label = "-vs-".join(slug(n) for n in _names(paths))
    return paths[0].resolve().parent / ("compare-" + label[:80])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.json")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: compare-<run>-vs-<run> beside the runs)",
    )
    parser.add_argument(
        "--metric",
        default="overlap",
        help=f"metric to plot: {', '.join(METRICS)} (default overlap)",
    )


def main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out) if args.out else default_out(args.runs)
    out = compare(args.runs, out_dir, metric=args.metric)
    _print_table(out["compare.csv"], args.metric)
    print(f"figure: {out['compare.png']}\ntable:  {out['compare.csv']}")
    return 0


def _print_table(csv_path: Path, metric: str) -> None:
    """Per run x attack x norm: the metric at the first and last layer and its lowest layer."""

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["run"], r["attack"], r["norm"]), []).append(r)
    for (run, attack, norm), rs in groups.items():
        vals = [(r["layer"], float(r[f"{metric}_mean"])) for r in rs if r[f"{metric}_mean"]]
        if vals:
            low = min(vals, key=lambda t: t[1])
            print(f"{run} {attack} {norm}: {metric} {vals[0][1]:.3f} at {vals[0][0]} -> "
                  f"{vals[-1][1]:.3f} at {vals[-1][0]}; lowest {low[1]:.3f} at {low[0]}")  # fmt: skip
