"""Run the whole layer analysis at growing sample sizes (``--n``) or attack budgets (``--eps``).

``--eps``: one run per budget (every norm of the config at that eps), in
runs/eps-sweep-<name>/eps<E>/; eps_sweep.json and eps_sweep.md (figures beside) give, per layer,
the calibrated overlap and the attack success rate at each eps, the robustness radius (the
smallest eps at which the calibrated overlap falls below one half, linearly interpolated from
eps = 0, where it is 1) and the matched-success view (the calibrated overlap at attack success
rates 0.25, 0.5, 0.75, so that models of different robustness compare fairly).

Each size is a full `advlens run` of the same configuration with data.n set to that size, in
runs/sweep-<name>/n<N>/ (resumable like any run). The sweep writes sweep.json, sweep.md
(seconds per stage per N; overlap per layer per N; the calibrated overlap per layer per N with
its 95% interval), sweep.png (time per stage, overlap per layer) and sweep-vs-n.png (calibrated
overlap against N per layer, interval bars) into runs/sweep-<name>/, updated after every size
so a long sweep keeps what it has measured. Sizes beyond the test split's correctly classified
images need the training split: --set data.split=train.

Examples:
  advlens sweep --n 200,500,1000
  advlens sweep --n 1000,10000,100000 --config configs/default.toml --set embed.engine=auto
  advlens sweep --n 500,1000 --set attack.norms=linf --name linf-only
  advlens sweep --n 1000,4000,16000 --set data.split=train
  advlens sweep --eps 0.01,0.02,0.05,0.1,0.2 --set attack.norms=linf --set data.n=500
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from advlens._io import atomic_write, write_json
from advlens.eps_sweep import parse_eps, render_eps_markdown, run_eps_sweep
from advlens.errors import ConfigError
from advlens.report.sweep_figures import (
    ordered,
    row_group,
    row_variant,
    time_and_overlap_figure,
    vs_n_figure,
)
from advlens.run import sweep_point, sweep_start

ROW_KEYS = ("attack", "norm", "eps", "layer", "layer_index", "engine", "seed", "perplexity", "k",
            "n", "success_rate", "overlap", "calibrated", "ci_low", "ci_high", "mixing", "pair", "overlap_reduced", "auc",
            "seconds_reduce", "seconds_embed", "seconds_overlap", "error")  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", default=None, help="sample sizes, comma list: 1000,10000,100000")
    parser.add_argument("--eps", default=None, help="attack budgets, comma list: 0.01,0.05,0.1")
    parser.add_argument("--config", default=None, help="TOML file (default: configs/default.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting for every size, e.g. --set embed.engine=auto")  # fmt: skip
    parser.add_argument(
        "--name", default=None, help="sweep name (default: the config's output.name)"
    )


def main(args: argparse.Namespace) -> int:
    if (args.n is None) == (args.eps is None):
        raise ConfigError("advlens sweep: give one of --n 500,1000 or --eps 0.01,0.05,0.1")
    if args.eps is not None:
        res = run_eps_sweep(parse_eps(args.eps), config=args.config, overrides=args.overrides,
                            name=args.name, progress=not getattr(args, "quiet", False))  # fmt: skip
        print(render_eps_markdown(res))
        print(f"wrote {Path(res['folder']) / 'eps_sweep.json'} (.md and figures beside)")
        return 0
    sizes = parse_sizes(args.n)
    out = run_sweep(sizes, config=args.config, overrides=args.overrides, name=args.name,
                    progress=not getattr(args, "quiet", False))  # fmt: skip
    print(render_markdown(out))
    print(f"wrote {Path(out['folder']) / 'sweep.json'} (.md, .png beside)")
    return 0


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for item in str(text).split(","):
        item = item.strip().replace("_", "")
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(f"--n: {item!r} is not an integer, e.g. --n 1000,10000") from None
        if value < 1:
            raise ConfigError(f"--n: {value} must be at least 1")
        sizes.append(value)
    if not sizes:
        raise ConfigError("--n: give at least one sample size, e.g. --n 1000,10000")
    return sorted(set(sizes))


def run_sweep(
    sizes: list[int],
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One :func:`advlens.run.run` per size; returns (and writes) the sweep summary."""

    _, out, folder = sweep_start(config, overrides, name, "sweep", "sizes")
    overrides, name = out["overrides"], out["name"]
    for n in sizes:
        result, seconds = sweep_point(
            config, [*overrides, f"data.n={n}"], f"sweep-{name}/n{n}", progress=progress
        )
        out["sizes"].append(
            {
                "n": n,
                "run_dir": str(result.run_dir),
                "wall_seconds": seconds,
                "timings": dict(result.timings),
                "rows": [{k: r.get(k) for k in ROW_KEYS} for r in result.rows],
            }
        )
        out["summary"] = summarise(out["sizes"])
        write_outputs(out, folder)
    return out


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per stage per N, and overlap per (attack-norm, layer, engine) per N."""
    stages = list(dict.fromkeys(k for e in entries for k in e["timings"]))
    metric: dict[str, dict[str, Any]] = {}
    for e in entries:
        for r in e["rows"]:
            key = f"{row_group(r)} | {r.get('layer')} | {row_variant(r)}"
            slot = metric.setdefault(key, {"layer_index": r.get("layer_index"), "values": {}})
            slot["values"][str(e["n"])] = r.get("overlap")
            slot.setdefault("calibrated", {})[str(e["n"])] = [
                r.get("calibrated"),
                r.get("ci_low"),
                r.get("ci_high"),
            ]
    for slot in metric.values():
        vals = [v for v in slot["values"].values() if isinstance(v, float) and math.isfinite(v)]
        steps = [abs(b - a) for a, b in zip(vals, vals[1:], strict=False)]
        slot["max_change"] = max(steps) if steps else None
    return {"stages": stages, "overlap": metric}


def render_markdown(out: dict[str, Any]) -> str:
    entries = out["sizes"]
    summary = out.get("summary") or summarise(entries)
    stages = summary["stages"]
    lines = [f"# Sweep {out['name']}", "", "## Seconds per stage", "",
             "| N | " + " | ".join(stages) + " | wall |",
             "|---:|" + "---:|" * (len(stages) + 1)]  # fmt: skip
    for e in entries:
        cells = [f"{e['timings'].get(s, float('nan')):.1f}" for s in stages]
        lines.append(f"| {e['n']} | " + " | ".join(cells) + f" | {e['wall_seconds']:.1f} |")
    ns = [str(e["n"]) for e in entries]
    lines += ["", "## Overlap per layer against N", "",
              "| attack-norm | layer | engine | " + " | ".join(f"N={n}" for n in ns)
              + " | max change |", "|---|---|---|" + "---:|" * (len(ns) + 1)]  # fmt: skip
    for key, slot in ordered(summary):
        vals = [slot["values"].get(n) for n in ns]
        cells = ["-" if v is None else f"{v:.3f}" for v in vals]
        change = "-" if slot["max_change"] is None else f"{slot['max_change']:.3f}"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {change} |")
    lines += ["", "## Calibrated overlap per layer against N (95% interval)", "",
              "| attack-norm | layer | engine | " + " | ".join(f"N={n}" for n in ns) + " |",
              "|---|---|---|" + "---:|" * len(ns)]  # fmt: skip
    for key, slot in ordered(summary):
        cal = slot.get("calibrated", {})
        lines.append(f"| {key} | " + " | ".join(_interval(cal.get(n)) for n in ns) + " |")
    lines += ["", "![calibrated overlap against N](sweep-vs-n.png)"]
    return "\n".join(lines) + "\n"


def _interval(cell: list | None) -> str:
    if not cell or cell[0] is None:
        return "-"
    value, low, high = cell
    return f"{value:.3f}" + ("" if low is None or high is None else f" [{low:.3f}, {high:.3f}]")


def write_outputs(out: dict[str, Any], folder: Path) -> list[Path]:
    folder = Path(folder)
    paths = [folder / f for f in ("sweep.json", "sweep.md", "sweep.png", "sweep-vs-n.png")]
    write_json(paths[0], out)
    atomic_write(paths[1], render_markdown(out).encode())
    summary = out.get("summary") or summarise(out["sizes"])
    time_and_overlap_figure(out, summary, paths[2])
    vs_n_figure(out, summary, paths[3])
    return paths
