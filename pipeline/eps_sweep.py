"""The per-layer robustness radius: the layer analysis at several attack budgets (``advlens
sweep --eps``).

One `advlens run` per eps (every norm of the config at that eps) in
``runs/eps-sweep-<name>/eps<E>/`` (each resumable like any run). Per (attack, norm, layer) the
calibrated overlap at each eps gives the radius (:func:`radius`: the smallest eps at which it
falls below one half, linearly interpolated, starting from eps = 0 where the two sets coincide
and the value is 1) and, with the attack success rate at each eps, the matched-success view
(:func:`at_success`: the calibrated overlap at given success rates). Writes eps_sweep.json,
eps_sweep.md and the figures eps_curve.png, radius.png, matched_success.png to the folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advlens._io import atomic_write, write_json
from advlens.errors import ConfigError
from advlens.report import figures as F
from advlens.run import sweep_point, sweep_start

THRESHOLD = 0.5
SUCCESS_LEVELS = (0.25, 0.5, 0.75)


def parse_eps(text: str) -> list[float]:
    """``"0.01,0.05,0.1"`` -> sorted unique budgets (each finite and > 0)."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(
                f"--eps: {item!r} is not a number, e.g. --eps 0.01,0.05,0.1"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--eps: {item} must be a finite number > 0 (eps = 0 is the anchor)")
        out.append(value)
    if not out:
        raise ConfigError("--eps: give at least one budget, e.g. --eps 0.01,0.05,0.1")
    return sorted(set(out))


def radius(
    eps: Sequence[float], values: Sequence[float], threshold: float = THRESHOLD
) -> float | None:
    """Smallest eps at which ``values`` (calibrated overlap at increasing ``eps``) fall below
    ``threshold``, linearly interpolated between the last eps above it and the first below;
    the curve starts at (0, 1). None when it never falls below (the radius exceeds max eps)."""
    xs = [0.0, *map(float, eps)]
    ys = [1.0, *map(float, values)]
    for i in range(1, len(xs)):
        if ys[i] < threshold:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return x0 + (y0 - threshold) / (y0 - y1) * (x1 - x0)
    return None


def at_success(success: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """Calibrated overlap interpolated at attack success rate ``level`` (None outside the
    measured success range; the curve starts at (0, 1): no success, eps = 0)."""
    pts = sorted(zip([0.0, *map(float, success)], [1.0, *map(float, values)], strict=True))
    s = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts])
    if not s[0] <= level <= s[-1]:
        return None
    return float(np.interp(level, s, v))


def summarise_eps(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (attack, norm, layer): eps, calibrated overlap and success rate per eps,
    the radius and the matched-success values. Repeats (seeds, engines) are averaged per eps."""
    curves: dict[tuple, dict[float, list[dict]]] = {}
    for e in entries:
        for r in e["rows"]:
            if r.get("error") or r.get("calibrated") is None:
                continue
            key = (r["attack"], r["norm"], r["layer"], r.get("layer_index"))
            curves.setdefault(key, {}).setdefault(float(e["eps"]), []).append(r)
    out = []
    for (attack, norm, layer, li), per_eps in curves.items():
        eps = sorted(per_eps)
        val = [float(np.mean([r["calibrated"] for r in per_eps[x]])) for x in eps]
        succ = [float(np.mean([r["success_rate"] for r in per_eps[x]])) for x in eps]
        out.append({
            "attack": attack, "norm": norm, "layer": layer, "layer_index": li,
            "eps": eps, "calibrated": val, "success_rate": succ,
            "radius": radius(eps, val),
            "at_success": {str(s): at_success(succ, val, s) for s in SUCCESS_LEVELS},
        })  # fmt: skip
    return sorted(out, key=lambda d: (d["attack"], d["norm"], d["layer_index"] or 0))


def run_eps_sweep(
    eps_list: list[float],
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One :func:`advlens.run.run` per eps; returns (and writes) the sweep summary."""

    base, out, folder = sweep_start(config, overrides, name, "eps-sweep", "runs")
    overrides, name = out["overrides"], out["name"]
    for eps in eps_list:
        budget = [f"attack.eps.{norm}={eps}" for norm in base.attack.norms]
        result, seconds = sweep_point(
            config, [*overrides, *budget], f"eps-sweep-{name}/eps{eps:g}", progress=progress
        )
        out["runs"].append({"eps": eps, "run_dir": str(result.run_dir),
                            "wall_seconds": seconds, "rows": result.rows})  # fmt: skip
        out["layers"] = summarise_eps(out["runs"])
        write_eps_outputs(out, folder)
    return out


def statistic(out: dict[str, Any]) -> str:
    """Which value the sweep reads, from its rows: ``"share, space reduced"`` (every row records
    its ``variant`` and ``space``; several are listed)."""
    seen = {(r.get("variant"), r.get("space")) for e in out.get("runs", []) for r in e["rows"]
            if r.get("calibrated") is not None}  # fmt: skip
    return "; ".join(f"{v}, space {s}" for v, s in sorted(seen, key=str)) or "none yet"


def render_eps_markdown(out: dict[str, Any]) -> str:
    lines = [f"# Eps sweep {out['name']}", "",
             f"Calibrated value per layer ({statistic(out)}; 1 = as mixed as random labels); "
             "radius: the smallest "
             f"eps at which it falls below {THRESHOLD} (interpolated; '>' = not reached).", "",
             "![overlap against eps](eps_curve.png) ![radius per layer](radius.png) "
             "![matched success](matched_success.png)", ""]  # fmt: skip
    layers = out.get("layers") or []
    eps = sorted({x for d in layers for x in d["eps"]})
    lines += ["| attack-norm | layer | " + " | ".join(f"eps={x:g}" for x in eps)
              + " | radius | " + " | ".join(f"@success {s:g}" for s in SUCCESS_LEVELS) + " |",
              "|---|---|" + "---:|" * (len(eps) + 1 + len(SUCCESS_LEVELS))]  # fmt: skip
    for d in layers:
        by = dict(zip(d["eps"], d["calibrated"], strict=True))
        cells = [f"{by[x]:.3f}" if x in by else "-" for x in eps]
        rad = f"{d['radius']:.4g}" if d["radius"] is not None else f"> {max(d['eps']):g}"
        matched = [f"{v:.3f}" if v is not None else "-" for v in d["at_success"].values()]
        lines.append(f"| {d['attack']}-{d['norm']} | {d['layer']} | " + " | ".join(cells)
                     + f" | {rad} | " + " | ".join(matched) + " |")  # fmt: skip
    succ: dict[str, dict[float, float]] = {}
    for d in layers:
        succ.setdefault(f"{d['attack']}-{d['norm']}", dict(zip(d["eps"], d["success_rate"],
                                                               strict=True)))  # fmt: skip
    lines += ["", "Attack success rate per eps:", "",
              "| attack-norm | " + " | ".join(f"eps={x:g}" for x in eps) + " |",
              "|---|" + "---:|" * len(eps)]  # fmt: skip
    for g, by in succ.items():
        lines.append(f"| {g} | " + " | ".join(f"{by[x]:.3f}" if x in by else "-" for x in eps)
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_eps_outputs(out: dict[str, Any], folder: Path) -> list[Path]:
    folder = Path(folder)
    layers = out.get("layers") or []
    paths = [folder / "eps_sweep.json", folder / "eps_sweep.md"]
    write_json(paths[0], out)
    atomic_write(paths[1], render_eps_markdown(out).encode())
    for fname, fn in (("eps_curve.png", F.eps_curve_figure), ("radius.png", F.radius_figure),
                      ("matched_success.png", F.matched_success_figure)):  # fmt: skip
        paths.append(fn(layers, folder / fname))
    return paths
