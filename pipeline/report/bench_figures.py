"""The figure of ``advlens bench tsne`` (FILE.png): t-SNE time and quality against the number
of points, per engine, beside the reference timings (``result``: see
:func:`advlens.bench.run_bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from advlens.report.figures import save

DPI = 120


def tsne_bench_figure(result: dict[str, Any], path: str | Path) -> Path:
    fig = Figure(figsize=(11, 4.2))
    ax_t, ax_q = fig.subplots(1, 2)
    names = list(dict.fromkeys(r["engine"] for r in result["results"]))
    for i, name in enumerate(names):
        ok = sorted((r for r in result["results"] if r["engine"] == name and r["status"] == "ok"),
                    key=lambda r: r["n"])  # fmt: skip
        if not ok:
            continue
        colour = f"C{i}"
        ns = [r["n"] for r in ok]
        ax_t.plot(ns, [r["seconds_total"] for r in ok], "o-", color=colour, label=name)
        ax_q.plot(ns, [r["recall@10"] for r in ok], "o-", color=colour, label=f"{name} recall@10")
        ax_q.plot(ns, [r["trustworthiness"] for r in ok], "s--", color=colour, alpha=0.6,
                  label=f"{name} trustworthiness")  # fmt: skip
    ref = result["reference"]["rows"]
    ax_t.scatter([r["n"] for r in ref], [r["seconds"] for r in ref], marker="x", color="grey",
                 label="reference (not this run)")  # fmt: skip
    ax_q.scatter([r["n"] for r in ref], [r["recall@10"] for r in ref], marker="x", color="grey",
                 label="reference recall (not this run)")  # fmt: skip
    spots: dict[int, list[str]] = {}  # one label block per size, so labels never overlap
    for r in ref:
        spots.setdefault(r["n"], []).append(f"{r['engine']}, {r['machine']}: {r['seconds']:.0f} s")
    for n, labels in spots.items():
        top = max(r["seconds"] for r in ref if r["n"] == n)
        ax_t.annotate("\n".join(labels), (n, top), fontsize=6, color="grey", xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    ax_t.set(xscale="log", yscale="log", xlabel="points", ylabel="seconds (kNN + optimisation)",
             title="t-SNE time")  # fmt: skip
    ax_q.set(xscale="log", xlabel="points", ylabel="score", ylim=(0, 1.02), title="quality")
    ax_t.legend(fontsize=7)
    ax_q.legend(fontsize=6)
    fig.suptitle(f"{result['data']} - {result['environment']['device']}", fontsize=8)
    fig.tight_layout()
    return save(fig, path, dpi=DPI)
