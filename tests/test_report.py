"""Report stage: metrics tables, aggregation of repeats, figures, report.html, compare, progress.

Synthetic run folders with the layout the run stage writes (tasks/<id>.json + .npz), built
from seeded point clouds whose perturbed twins drift further from the clean points with
every layer; overlap values come from a brute-force kNN oracle.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import html.parser
import io
import json
import logging
import math
import os
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from advlens import progress
from advlens._io import record
from advlens.errors import ConfigError, StoreError
from advlens.report import (
    aggregate,
    detector_summary,
    overlap_drops,
    read_metrics,
    summary,
    tables,
    write_outputs,
)
from advlens.report import compare as cmp
from advlens.report import figures as F
from advlens.report import html as rhtml

LAYERS = ["input", "conv1", "relu1", "pool1", "fc1", "logits"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- synthetic runs
def knn_oracle(xy: np.ndarray, k: int) -> np.ndarray:
    """Brute-force kNN (self excluded, ties by index)."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def overlap_oracle(xy, is_perturbed, k):
    nbr = knn_oracle(xy, k)
    return (is_perturbed[nbr] != is_perturbed[:, None]).any(axis=1).astype(float)


def make_run(
    root: Path,
    name: str = "run",
    *,
    layers=LAYERS,
    norms=("l2", "linf"),
    engines=("opentsne",),
    seeds=(0,),
    n: int = 40,
    step: float = 0.9,
    noise: float = 0.3,
    fail: tuple[str, str] | None = None,
    store: bool = False,
) -> tuple[Path, list[dict]]:
    """A run folder whose perturbed cloud moves ``step * layer_index`` away per layer; with
    ``store``, an activation store per norm holding 8 x 8 input images (for thumbnails)."""
    run = root / name
    (run / "tasks").mkdir(parents=True)
    if store:
        for norm in norms:
            write_store(run / f"apgd-ce-{norm}.zarr", n, seed=len(norm))
    rows = []
    for norm, (li, layer), engine, seed in product(norms, enumerate(layers), engines, seeds):
        task_id = f"apgd-ce-{norm}-{li:03d}-{engine}-s{seed}-p30"
        row = {
            "task_id": task_id, "attack": "apgd-ce", "norm": norm, "eps": 1.5 if norm == "l2" else 0.1,
            "layer": layer, "layer_index": li, "engine": engine, "seed": seed,
            "perplexity": 30.0, "k": 10, "n": n, "success_rate": 0.9,
        }  # fmt: skip
        if fail == (norm, layer):
            rows.append({**row, "error": "RuntimeError: out of memory"})
            continue
        rng = np.random.default_rng([li, seed, len(norm), len(engine)])
        labels = np.arange(n) % 3
        clean = rng.normal(size=(n, 2)) + 3.0 * np.stack([labels, labels % 2], axis=1)
        shift = step * li * (1.3 if norm == "linf" else 1.0)
        pert = clean + rng.normal(scale=noise, size=(n, 2)) + [shift, 0.0]
        xy = np.concatenate([clean, pert]).astype(np.float32)
        isp = np.repeat([False, True], n)
        per_point = overlap_oracle(xy.astype(float), isp, 10)
        ov = float(per_point.mean())
        # layer 2 disagrees by 0.3 with its reduced points: an artefact flag
        red = (ov + 0.3 if ov < 0.5 else ov - 0.3) if li == 2 else min(1.0, ov + 0.05)
        row.update(
            overlap=ov, mixing=ov * 0.8, pair=ov * 0.5, overlap_reduced=red,
            artefact_flag=abs(ov - red) > 0.2, auc=min(1.0, 0.5 + 0.1 * li + 0.01 * seed),
            ci_low=max(0.0, ov - 0.05), ci_high=min(1.0, ov + 0.05), seconds_reduce=0.1,
            seconds_embed=1.0, seconds_overlap=0.01, error=None,
            calibrated=ov, overlap_reduced_calibrated=red,  # k = 10: chance ~ 1
            share=ov / 2, share_reduced=red / 2, map_calibrated=ov, reduced_calibrated=red,
            variant="overlap", space="map",
        )  # fmt: skip
        rows.append(row)
        (run / "tasks" / f"{task_id}.json").write_text(json.dumps(row))
        np.savez(
            run / "tasks" / f"{task_id}.npz",
            xy=xy,
            is_perturbed=isp,
            labels=np.concatenate([labels, labels]),
            per_point=per_point,
        )
    return run, rows


def write_store(path: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A real activation store with only the input layer (1 x 8 x 8 images in [0, 1]); every
    other sample's attack succeeds and moves the prediction to the next class."""
    from advlens.store import ActivationStore

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    clean = rng.random((n, 64), dtype=np.float32)
    pert = np.clip(clean + rng.normal(scale=0.2, size=(n, 64)), 0, 1).astype(np.float32)
    success = np.arange(n) % 2 == 1
    samples = {
        "index": 1000 + np.arange(n), "label": labels, "pred_clean": labels,
        "pred_perturbed": np.where(success, (labels + 1) % 3, labels), "success": success,
        "norm": np.linalg.norm(pert - clean, axis=1).astype(np.float32),
    }  # fmt: skip
    store = ActivationStore.create(
        path, n=n, layers={"input": 64}, batch_size=n, dtype="float32", attrs={"config": {}}
    )
    with store.writer() as w:
        w.put(0, samples, {"input": (clean, pert)})
    return {**samples, "clean": clean, "perturbed": pert}


PROVENANCE = {
    "advlens_version": "0.1.0",
    "model": {"name": "small-cnn", "sha256": "abc"},
    "dataset": {"name": "fashion-mnist", "split": "test"},
    "device": "cpu",
    "versions": {"torch": "2.13.0", "numpy": np.__version__},
    "timings": {"train": 1.0, "attack+extract": 2.0, "embed": 3.0},
    "config": {"overlap": {"k": 10, "k_sweep": [5, 10, 20]}, "data": {"source": "fashion-mnist"}},
}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run, rows = make_run(tmp_path_factory.mktemp("single"))
    out = write_outputs(run, rows, LAYERS, PROVENANCE, progress=False)
    return run, rows, out


@pytest.fixture(scope="module")
def repeat_run(tmp_path_factory):
    run, rows = make_run(
        tmp_path_factory.mktemp("repeat"), engines=("opentsne", "sklearn"), seeds=(0, 1, 2)
    )
    out = write_outputs(run, rows, LAYERS, PROVENANCE, progress=False)
    return run, rows, out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    w, h, _ = rhtml.png_info(data)
    return w, h


# ---------------------------------------------------------------- outputs and figures
def test_write_outputs_writes_every_file_as_valid_png(single_run):
    run, _, out = single_run
    expected = {
        "metrics.json", "metrics.csv", "provenance.json", "report.html",
        "figures/layer_curve.png", "figures/detector.png", "figures/artefact.png",
        "figures/k_sweep.png", "figures/per_class.png",
    }  # fmt: skip
    for norm in ("l2", "linf"):
        expected |= {
            f"figures/maps-apgd-ce-{norm}.png",
            f"figures/labels-apgd-ce-{norm}.png",
            f"figures/labels-apgd-ce-{norm}-logits.png",
        }
    assert expected <= set(out)
    for name, path in out.items():
        assert path == run / name and path.is_file() and path.stat().st_size > 0
        if name.endswith(".png"):
            w, h = png_size(path)
            assert w > 100 and h > 100
    assert "metrics_aggregate.csv" not in out  # no repeats


def test_curve_is_a_paper_column_at_300_dpi(single_run):
    run, _, _ = single_run
    w_in, h_in = F.curve_size(len(LAYERS), LAYERS)
    assert w_in == F.COLUMN_IN
    w, h = png_size(run / "figures/layer_curve.png")
    assert (w, h) == (round(w_in * F.DPI), round(h_in * F.DPI))
    assert png_size(run / "figures/detector.png") == (w, h)


def test_maps_grid_has_one_panel_per_layer(single_run):
    run, _, _ = single_run
    ncols, nrows = F._grid(len(LAYERS))
    assert ncols * nrows >= len(LAYERS) > ncols * (nrows - 1)
    w, h = png_size(run / "figures/maps-apgd-ce-l2.png")
    assert (w, h) == (round(ncols * 1.3 * F.MAP_DPI), round((nrows * 1.3 + 0.45) * F.MAP_DPI))


def _colour_share(path: Path, hex_colour: str, tol: int = 40) -> float:
    """Share of pixels near ``hex_colour`` above the legend (the bottom 0.5 in)."""
    from matplotlib.image import imread

    img = imread(path)[: -int(0.5 * F.MAP_DPI), :, :3]
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return float((np.abs(img - target).max(axis=-1) < tol / 255).mean())


def test_maps_show_green_and_red_only_where_points_separate(tmp_path):
    # identical clouds: every point overlaps -> no green/red; far apart: plenty of both
    for step, expect_colour in ((0.0, False), (50.0, True)):
        run, rows = make_run(
            tmp_path, f"s{step}", layers=["a", "b"], norms=("l2",), step=step, noise=0.0
        )
        maps = tables.load_maps(run, rows)[("apgd-ce", "l2")]
        assert (maps[1].per_point.min() == 1.0) != expect_colour
        png = F.maps_figure(maps[1:], tmp_path / f"m{step}.png")
        for colour in (F.CLEAN, F.PERTURBED):
            assert (_colour_share(png, colour) > 1e-4) == expect_colour


@pytest.mark.parametrize("n_layers", [45, 160])
def test_many_layer_names_stay_readable(n_layers):
    names = [f"block{i // 4}.layer{i % 4}.conv{i % 3}" for i in range(n_layers)]
    w, h = F.curve_size(n_layers, names)
    assert w == F.PAGE_IN
    fig = Figure(figsize=(w, h), dpi=F.DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(n_layers), np.linspace(1, 0, n_layers))
    F.layer_axis(ax, names, w)
    fig.canvas.draw()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    fs = labels[0].get_fontsize()
    assert fs >= 5 and len(labels) >= min(n_layers, 40)
    boxes = sorted((b.x0, b.x1) for b in (t.get_window_extent() for t in labels))
    assert all(a[1] <= b[0] + 0.5 for a, b in zip(boxes, boxes[1:], strict=False)), "overlap"
    fig_box = fig.bbox
    assert all(b.y0 >= fig_box.y0 - 1 for b in (t.get_window_extent() for t in labels))


# ---------------------------------------------------------------- tables
def test_metrics_csv_has_one_row_per_layer_and_norm(single_run):
    run, rows, _ = single_run
    with open(run / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(LAYERS) * 2
    assert {(r["layer"], r["norm"]) for r in table} == set(product(LAYERS, ("l2", "linf")))
    assert set(tables.ROW_KEYS) <= set(table[0])
    by_key = {(r["layer"], r["norm"]): r for r in rows}
    for r in table:
        assert float(r["overlap"]) == pytest.approx(by_key[r["layer"], r["norm"]]["overlap"])
        assert r["error"] == ""
    back, layers = read_metrics(run)
    assert layers == LAYERS and len(back) == len(rows)


def test_aggregation_matches_numpy(repeat_run):
    run, rows, out = repeat_run
    agg = aggregate(rows, LAYERS)
    assert len(agg) == len(LAYERS) * 2
    for a in agg:
        group = [r for r in rows if (r["layer"], r["norm"]) == (a["layer"], a["norm"])]
        assert a["n_repeats"] == len(group) == 6
        for m in tables.METRICS:
            v = np.array([r[m] for r in group])
            assert a[f"{m}_mean"] == pytest.approx(np.mean(v))
            assert a[f"{m}_std"] == pytest.approx(np.std(v, ddof=1))
            assert v.min() - 1e-12 <= a[f"{m}_boot_low"] <= a[f"{m}_boot_high"] <= v.max() + 1e-12
        assert a["engines"] == "opentsne sklearn" and a["seeds"] == "0 1 2"
    with open(out["metrics_aggregate.csv"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(agg)
    with open(run / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_bootstrap_interval_matches_scipy():
    from scipy.stats import bootstrap

    v = np.random.default_rng(3).uniform(0.2, 0.9, size=12)
    lo, hi = tables.bootstrap_mean(v, n_boot=5000)
    ref = bootstrap((v,), np.mean, n_resamples=5000, method="percentile", random_state=1)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.02)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=15))
def test_stats_properties(values):
    s = tables._stats(values)
    v = np.array(values)
    assert s["mean"] == pytest.approx(v.mean())
    assert s["std"] == pytest.approx(np.std(v, ddof=1) if v.size > 1 else 0.0)
    assert v.min() - 1e-12 <= s["boot_low"] <= s["boot_high"] <= v.max() + 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 60), st.integers(0, 10_000), st.floats(0, 6))
def test_k_sweep_matches_bruteforce(n, seed, shift):
    rng = np.random.default_rng(seed)
    xy = rng.normal(size=(2 * n, 2))
    xy[n:, 0] += shift
    isp = np.repeat([False, True], n)
    got = tables.knn_overlap_sweep(xy, isp, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(overlap_oracle(xy, isp, k).mean())


def test_json_rows_are_plain_and_nan_free(tmp_path):
    rows = [{"layer": "a", "layer_index": np.int64(0), "norm": "l2", "attack": "x",
             "overlap": np.float32(0.5), "auc": float("nan"), "path": tmp_path}]  # fmt: skip
    tables.write_metrics(tmp_path, rows, ["a"])
    back, _ = read_metrics(tmp_path)
    assert back[0]["overlap"] == 0.5 and back[0]["auc"] is None
    assert back[0]["path"] == str(tmp_path) and back[0]["layer_index"] == 0


def test_failed_tasks_are_listed_not_aggregated(tmp_path):
    run, rows = make_run(tmp_path, layers=LAYERS[:3], fail=("linf", "relu1"))
    out = tables.write_metrics(run, rows, LAYERS[:3])
    out["report.html"] = rhtml.write_report(run)  # figures are not needed here
    agg = aggregate(rows, LAYERS[:3])
    assert ("relu1", "linf") not in {(a["layer"], a["norm"]) for a in agg}
    with open(out["metrics.csv"], newline="") as fh:
        errors = [r["error"] for r in csv.DictReader(fh) if r["error"]]
    assert errors == ["RuntimeError: out of memory"]
    assert "1 of 6 task(s) failed" in summary(rows)
    assert "Failed tasks (1)" in out["report.html"].read_text()


def test_missing_run_and_bad_metric_are_clear_errors(tmp_path, single_run):
    with pytest.raises(StoreError, match="metrics.json"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"closest valid names.*: overlap"):
        cmp.compare([single_run[0]], tmp_path / "c", metric="overlp")


# ---------------------------------------------------------------- summary
def test_summary_names_the_biggest_drops_and_detector_layers(single_run):
    run, rows, _ = single_run
    text = summary(rows, run)
    assert str(run) in text
    agg = aggregate(rows, LAYERS)
    for norm in ("l2", "linf"):
        curve = np.array([next(a["calibrated_mean"] for a in agg if (a["layer"], a["norm"]) ==
                               (layer, norm)) for layer in LAYERS])  # fmt: skip
        drop = curve[:-1] - curve[1:]
        worst = LAYERS[int(np.argmax(drop)) + 1]
        assert overlap_drops(agg)[("apgd-ce", norm)][0][0] == worst
        line = next(s for s in text.splitlines() if s.startswith(f"apgd-ce {norm} "))
        assert f"drops most at {worst} " in line
        aucs = [next(r["auc"] for r in rows if (r["layer"], r["norm"]) == (layer, norm))
                for layer in LAYERS]  # fmt: skip
        first = LAYERS[next(i for i, v in enumerate(aucs) if v > 0.95)]
        best = LAYERS[int(np.argmax(aucs))]
        det = next(s for s in detector_summary(agg) if s.startswith(f"apgd-ce {norm}:"))
        assert f"first at {first} " in det and det.endswith(f"at {best}")


# ---------------------------------------------------------------- report.html
class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.rows, self.flagged, self.titles = [], [], 0, 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "th":
            self.titles.append(a.get("title"))
        self.urls += [(tag, k, v) for k, v in attrs if k in ("src", "href", "action", "data")]
        if tag == "tr" and "metric-row" in (a.get("class") or ""):
            self.rows += 1
            self.flagged += "flag" in a["class"].split()


def test_report_is_self_contained(single_run):
    run, rows, out = single_run
    p = _Links()
    p.feed(out["report.html"].read_text())
    # BokehJS and the plots' data are inline scripts: no script names a source to fetch
    assert "script" in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert not [u for u in p.urls if u[0] == "script"]
    assert p.rows == len(LAYERS) * 2
    flags = sum(abs(r["overlap"] - r["overlap_reduced"]) > 0.2 for r in rows)
    assert p.flagged == flags > 0
    imgs = [v for tag, k, v in p.urls if tag == "img"]
    assert len(imgs) == len(list((run / "figures").glob("*.png")))
    for tag, key, url in p.urls:
        assert not url.lower().startswith(("http:", "https:", "//", "file:")), (tag, key, url)
    for url in imgs:
        import base64

        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1])[:8] == PNG_MAGIC
    text = out["report.html"].read_text()
    for fact in ("small-cnn", "fashion-mnist", "torch", "attack+extract", "k_sweep"):
        assert fact in text


def test_report_shows_spread_when_repeats_ran(repeat_run):
    run, _, out = repeat_run
    text = out["report.html"].read_text()
    assert "±" in text and "All repeats" in text
    p = _Links()
    p.feed(text)
    assert p.rows == len(LAYERS) * 2  # still one row per layer and norm


def test_report_cli_regenerates_figures(tmp_path):
    run, rows = make_run(tmp_path, layers=LAYERS[:3], norms=("linf",))
    tables.write_metrics(run, rows, LAYERS[:3])
    parser = argparse.ArgumentParser()
    rhtml.configure(parser)
    assert rhtml.main(parser.parse_args([str(run)])) == 0
    assert png_size(run / "figures" / "layer_curve.png")[0] == round(F.COLUMN_IN * F.DPI)
    assert (run / "report.html").is_file()
    assert "advlens report runs/" in rhtml.__doc__ and "advlens compare runs/" in cmp.__doc__


# ---------------------------------------------------------------- compare
@pytest.mark.parametrize("same_layers", [True, False])
def test_compare_two_runs_writes_one_figure_and_one_table(tmp_path, same_layers):
    a, rows_a = make_run(tmp_path, "model-a")
    b_layers = LAYERS if same_layers else LAYERS[:4]
    b, rows_b = make_run(tmp_path, "model-b", layers=b_layers, step=0.5)
    for run, rows, layers in ((a, rows_a, LAYERS), (b, rows_b, b_layers)):
        tables.write_metrics(run, rows, layers)
    parser = argparse.ArgumentParser()
    cmp.configure(parser)
    out_dir = tmp_path / "cmp"
    assert cmp.main(parser.parse_args([str(a), str(b), "--out", str(out_dir)])) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["compare.csv", "compare.png"]
    w, _ = png_size(out_dir / "compare.png")
    assert w == round(F.COLUMN_IN * F.DPI)
    with open(out_dir / "compare.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 * (len(LAYERS) + len(b_layers))
    assert {r["run"] for r in table} == {"model-a", "model-b"}
    ref = {(r["layer"], r["norm"]): r["overlap"] for r in rows_b}
    for r in table:
        if r["run"] == "model-b":
            assert float(r["overlap_mean"]) == pytest.approx(ref[r["layer"], r["norm"]])
            assert float(r["depth"]) == pytest.approx(int(r["layer_index"]) / (len(b_layers) - 1))
    assert cmp.default_out([a, b]) == tmp_path.resolve() / "compare-model-a-vs-model-b"


# ---------------------------------------------------------------- progress
def test_progress_log_lines_report_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="advlens.progress")
    with progress.bar(total=4, desc="embed", unit="task", enabled=False) as pb:
        pb.log_every = 0.0
        pb.set_postfix(layer="conv1")
        for _ in range(4):
            pb.update()
    lines = [r.getMessage() for r in caplog.records if r.name == "advlens.progress"]
    assert len(lines) == 4
    assert lines[1].startswith("embed: 2/4 task (50%)") and "task/s" in lines[1]
    assert "left" in lines[1] and "[layer=conv1]" in lines[1]
    assert lines[-1].startswith("embed: 4/4 task (100%)")


def test_progress_track_and_quiet(caplog):
    caplog.set_level(logging.INFO, logger="advlens.progress")
    progress.set_quiet(True)
    try:
        assert progress.is_quiet()
        assert list(progress.track(range(7), "attack", unit="batch", enabled=True)) == list(
            range(7)
        )
    finally:
        progress.set_quiet(False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "advlens.progress"]
    assert msgs and msgs[-1].startswith("attack: 7/7 batch (100%)")
    assert math.isfinite(float(msgs[-1].split(", ")[1].split()[0]))


def test_progress_draws_a_tqdm_bar_on_a_terminal(monkeypatch):
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        with os.fdopen(slave, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            with progress.bar(total=3, desc="attack", unit="batch") as pb:
                pb.update(3)
            tty.flush()
            chunks = []
            while select.select([master], [], [], 0.5)[0]:
                chunks.append(os.read(master, 65536))
            out = b"".join(chunks).decode()
    finally:
        os.close(master)
    assert "attack" in out and "3/3" in out and "batch/s" in out


def test_stale_figures_are_removed(tmp_path):
    run, rows = make_run(tmp_path, layers=LAYERS[:2], norms=("l2",))
    tables.write_metrics(run, rows, LAYERS[:2])
    (run / "figures").mkdir()
    stale = run / "figures" / "maps-old-attack-linf.png"
    stale.write_bytes(PNG_MAGIC)
    record(run, stale)  # an earlier pass of advlens wrote it
    keep = run / "figures" / "my-own-plot.png"
    keep.write_bytes(PNG_MAGIC)
    mine = run / "figures" / "maps-mine.png"  # named like an advlens figure, but the user's
    mine.write_bytes(PNG_MAGIC)
    from advlens.report import make_figures

    out = make_figures(run, rows, LAYERS[:2], PROVENANCE, progress=False)
    assert "figures/maps-apgd-ce-l2.png" in out
    assert not stale.exists() and keep.exists() and mine.exists()


# ---------------------------------------------------------------- interactive report
@pytest.fixture(scope="module")
def store_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    run, rows = make_run(root, store=True)
    stores = {norm: write_store(root / f"copy-{norm}.zarr", 40, seed=len(norm))
              for norm in ("l2", "linf")}  # fmt: skip
    prov = {**PROVENANCE, "accuracy": {"clean": 0.9, "n_split": 10_000, "robust": {}}}
    prov["layers"] = [{"name": name, "shape": [1, 8, 8] if name == "input" else [4, 2]}
                      for name in LAYERS]  # fmt: skip
    prov["timings"] = {"model": 1.0, "select": 0.5, "attack+extract": 2.0, "layers": 10.0,
                       "reduce": 3.0, "embed": 5.0, "overlap": 1.5}  # fmt: skip
    out = write_outputs(run, rows, LAYERS, prov, progress=False)
    return run, rows, out, stores


def test_thumbnails_hold_the_stored_images_once_per_sample(store_run):
    from PIL import Image

    from advlens.report import interactive as ia

    run, _, out, stores = store_run
    text = out["report.html"].read_text()
    for s in stores.values():
        clean, pert = (s[k].reshape(-1, 1, 8, 8) for k in ("clean", "perturbed"))
        sprites = ia.sprites(clean, pert)
        # one sprite per sample, shared by its two points and every layer's map
        assert [text.count(u) for u in sprites] == [1] * len(sprites)
        for i in (0, 17):
            png = base64.b64decode(sprites[i].split(",", 1)[1])
            img = np.asarray(Image.open(io.BytesIO(png)))
            assert img.shape == (8, 17)
            want = np.round(np.concatenate([clean[i, 0], pert[i, 0]], axis=1) * 255)
            got = np.concatenate([img[:, :8], img[:, 9:]], axis=1)
            assert np.abs(got - want).max() <= 1


def test_one_source_per_norm_holds_every_layer_and_the_attack_outcome(store_run):
    from advlens.report import interactive as ia

    run, rows, _, stores = store_run
    maps = tables.load_maps(run, rows)[("apgd-ce", "linf")]
    samples = ia.load_samples(run, maps, {})
    src, names = ia.build_source(maps, samples, ["a", "b", "c"])
    n = 40
    assert all(len(v) == n for v in src.data.values())
    for j, m in enumerate(maps):
        np.testing.assert_array_equal(src.data[f"x{j}p"], m.xy[n:, 0].astype(np.float32))
        np.testing.assert_array_equal(src.data[f"y{j}c"], m.xy[:n, 1].astype(np.float32))
        np.testing.assert_array_equal(src.data[f"o{j}c"], m.per_point[:n] > 0.5)
    s = stores["linf"]
    assert src.data["pp_name"] == [names[c] for c in s["pred_perturbed"]]
    assert src.data["outcome"] == ["succeeded" if x else "failed" for x in s["success"]]
    np.testing.assert_array_equal(src.data["index"], s["index"])
    np.testing.assert_allclose(src.data["pnorm"], s["norm"], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 40), st.integers(0, 10_000), st.integers(1, 6))
def test_neighbour_class_matches_bruteforce(n, seed, k):
    from advlens.report import interactive as ia

    rng = np.random.default_rng(seed)
    xy = rng.normal(size=(2 * n, 2))
    labels = np.tile(rng.integers(0, 4, n), 2)
    m = tables.TaskMap({"layer": "x"}, xy, np.repeat([False, True], n), labels, np.zeros(2 * n))
    k = min(k, n - 1)
    d = np.linalg.norm(xy[:, None] - xy[None, :n], axis=-1)  # to the clean points only
    d[np.arange(n), np.arange(n)] = np.inf
    nbr = np.argsort(d, axis=1, kind="stable")[:, :k]
    want = [np.bincount(labels[row], minlength=4).argmax() for row in nbr]
    np.testing.assert_array_equal(ia.majority_neighbour_class(m, k), want)


@pytest.mark.parametrize("fixture", ["single_run", "repeat_run"])
def test_curve_band_is_the_interval_and_names_k_and_n(fixture, request):
    from bokeh.models import VArea

    from advlens.report import interactive as ia

    _, rows, _ = request.getfixturevalue(fixture)[:3]
    agg = aggregate(rows, LAYERS)
    f = ia.curve_figure(agg, LAYERS)
    assert "k = 10" in f.title.text and "N = 40" in f.title.text
    bands = [r for r in f.renderers if isinstance(r.glyph, VArea)]
    assert len(bands) == 2
    for band in bands:
        d = band.data_source.data
        norm = d["series"][0].split()[-1]
        rs = sorted((a for a in agg if a["norm"] == norm), key=lambda a: a["layer_index"])
        lo, hi = (("overlap_boot_low", "overlap_boot_high") if fixture == "repeat_run"
                  else ("ci_low", "ci_high"))  # fmt: skip
        assert d["lo"] == [a[lo] for a in rs] and d["hi"] == [a[hi] for a in rs]
        assert all(a <= y <= b for a, y, b in zip(d["lo"], d["y"], d["hi"], strict=True))


def _table_after(text: str, marker: str) -> list[list[str]]:
    """The rows of the first table after ``marker``, cells as plain text."""
    import re

    chunk = text[text.index(marker) :]
    body = chunk[chunk.index("<tbody>") : chunk.index("</tbody>")]
    strip = lambda c: html.unescape(re.sub("<[^>]+>", "", c)).strip()  # noqa: E731
    return [[strip(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]  # fmt: skip


def test_report_shows_accuracies_layers_and_a_timing_total_counted_once(store_run):
    run, rows, out, _ = store_run
    text = out["report.html"].read_text()
    timings = dict(_table_after(text, "Timings (seconds)"))
    # reduce, embed and overlap ran inside "layers": the total counts them once
    assert float(timings["total"]) == pytest.approx(1.0 + 0.5 + 2.0 + 10.0)
    assert "of which embed (summed over tasks)" in timings
    layers = _table_after(text, f"Layers ({len(LAYERS)})")
    assert [r[1] for r in layers] == LAYERS and layers[0][2:] == ["1 x 8 x 8", "64"]
    acc = {r[0]: float(r[1]) for r in _table_after(text, 'id="accuracy"')}
    assert acc["clean accuracy"] == 0.9
    for norm, eps in (("l2", "1.5"), ("linf", "0.1")):
        assert acc[f"robust accuracy, apgd-ce {norm} ε={eps}"] == pytest.approx(0.9 * (1 - 0.9))
    p = _Links()
    p.feed(
        text[text.index('id="metrics"') - 100 : text.index("</table>", text.index('id="metrics"'))]
    )
    assert p.titles and all(t for t in p.titles)  # every metrics column is explained
    assert text.count('class="imaps"') == 2 and "No thumbnails" not in text


def test_report_without_stores_says_why_there_are_no_thumbnails(single_run):
    text = single_run[2]["report.html"].read_text()
    assert text.count('class="imaps"') == 2 and "No thumbnails" in text
