"""The figures of ``advlens sweep --n`` (sweep.png, sweep-vs-n.png), from the sweep's JSON
(``sizes``: one entry per N, ``summary``: see :func:`advlens.sweep.summarise`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from advlens.report.figures import norm_color, save

DPI = 110


def row_group(row: dict[str, Any]) -> str:
    """A row's attack-norm: one panel each."""
    return f"{row.get('attack')}-{row.get('norm')}"


def row_variant(row: dict[str, Any]) -> str:
    """A row's engine, seed and perplexity."""
    return f"{row.get('engine')} s{row.get('seed')} p{row.get('perplexity')}"


def ordered(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The summary's ``"attack-norm | layer | variant"`` slots by attack-norm, then layer."""
    return sorted(summary["overlap"].items(),
                  key=lambda kv: (kv[0].split(" | ")[0], kv[1]["layer_index"] or 0))  # fmt: skip


def vs_n_figure(out: dict[str, Any], summary: dict[str, Any], path: str | Path) -> Path:
    """Calibrated overlap against N, one line per layer (first engine / seed / perplexity of
    each attack-norm), with the rows' 95% intervals as bars."""
    groups = sorted({key.split(" | ")[0] for key in summary["overlap"]})
    fig = Figure(figsize=(1 + 4.5 * max(1, len(groups)), 4.2))
    axes: Any = fig.subplots(1, max(1, len(groups)), squeeze=False)[0]
    cmap = colormaps["viridis"]
    for ax, group in zip(axes, groups, strict=False):
        slots = [(k, s) for k, s in ordered(summary) if k.startswith(f"{group} | ")]
        first = slots[0][0].split(" | ")[2] if slots else None
        slots = [(k, s) for k, s in slots if k.split(" | ")[2] == first]
        for j, (key, slot) in enumerate(slots):
            cells = sorted((int(n), c) for n, c in slot.get("calibrated", {}).items()
                           if c and c[0] is not None)  # fmt: skip
            if not cells:
                continue
            ns = [n for n, _ in cells]
            vals = [c[0] for _, c in cells]
            # The half-sample interval is centred on its draws, so at a bound (calibrated 1)
            # it may lie beside the value: bars reach the interval's ends, never below zero.
            low = [max(0.0, c[0] - (c[1] if c[1] is not None else c[0])) for _, c in cells]
            high = [max(0.0, (c[2] if c[2] is not None else c[0]) - c[0]) for _, c in cells]
            ax.errorbar(ns, vals, yerr=[low, high], fmt="o-", capsize=3, ms=4,
                        color=cmap(j / max(1, len(slots) - 1)), label=key.split(" | ")[1])  # fmt: skip
        norm = group.rsplit("-", 1)[-1]
        ax.set_title(f"{group} ({first})", color=norm_color(norm), fontsize=9)
        ax.set(xscale="log", ylim=(-0.02, 1.05), xlabel="N (attacked samples)",
               ylabel="calibrated overlap (95% interval)")  # fmt: skip
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {out['name']}: calibrated overlap against N", fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=DPI)


def time_and_overlap_figure(out: dict[str, Any], summary: dict[str, Any], path: str | Path) -> Path:
    """Seconds per stage against N, and per attack-norm the overlap per layer, one line per N."""
    entries = out["sizes"]
    groups = sorted({row_group(r) for e in entries for r in e["rows"]})
    fig = Figure(figsize=(5 + 4.5 * len(groups), 4.2))
    axes: Any = fig.subplots(1, 1 + len(groups), squeeze=False)[0]
    ns = [e["n"] for e in entries]
    for stage in summary["stages"]:
        axes[0].plot(ns, [max(e["timings"].get(stage, 0.0), 1e-3) for e in entries], "o-",
                     label=stage)  # fmt: skip
    axes[0].plot(ns, [e["wall_seconds"] for e in entries], "k--", label="wall")
    axes[0].set(xscale="log", yscale="log", xlabel="N (attacked samples)", ylabel="seconds",
                title="time per stage")  # fmt: skip
    axes[0].legend(fontsize=7)
    cmap = colormaps["viridis"]
    for ax, group in zip(axes[1:], groups, strict=True):
        for j, e in enumerate(entries):
            rows = [r for r in e["rows"] if row_group(r) == group and r.get("overlap") is not None]
            # one line per N: the first engine / seed / perplexity of the group
            rows = sorted((r for r in rows if row_variant(r) == row_variant(rows[0])) if rows
                          else [], key=lambda r: r.get("layer_index") or 0)  # fmt: skip
            if not rows:
                continue
            colour = cmap(j / max(1, len(entries) - 1))
            ax.plot([r["layer_index"] for r in rows], [r["overlap"] for r in rows], "o-",
                    color=colour, label=f"N={e['n']}")  # fmt: skip
            ax.set_xticks([r["layer_index"] for r in rows], [r["layer"] for r in rows],
                          rotation=45, ha="right", fontsize=7)  # fmt: skip
        norm = group.rsplit("-", 1)[-1]
        ax.set_title(group, color=norm_color(norm))
        ax.set(ylim=(-0.02, 1.02), ylabel="overlap")
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {out['name']}", fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=DPI)
