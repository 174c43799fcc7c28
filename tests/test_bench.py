"""`advlens bench tsne` and `advlens sweep`: outputs, skipped engines, errors, summaries."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from advlens._optional import has
from advlens.cli import main as cli

TINY = ["--n-iter", "250", "--n-jobs", "1", "--sample", "150"]


@pytest.fixture(autouse=True)
def _omp_env(monkeypatch):
    """bench's main sets OMP_WAIT_POLICY when unset; keep that from outliving the test."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


def _rows(result):
    return {(r["engine"], r["n"]): r for r in result["results"]}


def test_bench_tsne_writes_outputs_and_lists_missing_engines_as_skipped(tmp_path, capsys):
    import openTSNE

    out = tmp_path / "bench.json"
    argv = ["bench", "--quiet", "tsne", "--engines", "sklearn,opentsne,cuml", "--n", "200,300"]
    assert cli([*argv, "--data", "synthetic", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = _rows(result)
    for n in (200, 300):
        for engine in ("sklearn", "opentsne"):
            r = rows[(engine, n)]
            assert r["status"] == "ok", r
            # one shared exact kNN graph: its time counts once per engine, beside the optimisation
            assert r["seconds_knn"] > 0 and r["seconds_optimise"] > 0
            assert r["seconds_total"] == pytest.approx(r["seconds_knn"] + r["seconds_optimise"])
            assert 0.0 <= r["recall@10"] <= 1.0 and 0.8 < r["trustworthiness"] <= 1.0
            assert r["params"]["knn"] == "precomputed"
        assert rows[("sklearn", n)]["seconds_knn"] == rows[("opentsne", n)]["seconds_knn"]
        assert rows[("sklearn", n)]["params"]["sklearn_learning_rate"] == pytest.approx(n / 48)
        base = rows[("opentsne-default", n)]  # plain openTSNE, measured in the same run
        assert base["status"] == "ok" and base["time_vs_baseline"] == pytest.approx(1.0)
        if not has("cuml"):
            assert rows[("cuml", n)]["status"] == "skipped"
            assert "cuml" in rows[("cuml", n)]["reason"]
    env = result["environment"]
    assert (
        env["cpu_count"] == os.cpu_count() and env["versions"]["openTSNE"] == openTSNE.__version__
    )
    assert "NOT measured in this run" in result["reference"]["label"]
    assert {(r["engine"], r["n"], r["seconds"]) for r in result["reference"]["rows"]} >= {
        ("opentsne", 10000, 38.0),
        ("opentsne", 70000, 84.0),
    }
    md = out.with_suffix(".md").read_text()
    assert "NOT measured in this run" in md and "| opentsne | 300 | ok |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "opentsne-default" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engines", "opentnse"], "closest valid names.*opentsne"),
        (["--engines", "opentsne", "--data", "mnist"], "--data 'mnist'"),
        (["--engines", "opentsne", "--n", "1e3"], "not an integer"),
    ],
)
def test_bench_errors_are_clear(tmp_path, capsys, args, message):
    import re

    base = ["bench", "tsne", "--data", "synthetic", "--n", "300", "--no-baseline"]
    assert cli([*base, *args, "--out", str(tmp_path / "x.json")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


def _store(path, n=100):
    """A tiny real store: layer 'near' (twins close) and 'far' (twins shifted away)."""
    from advlens.store import ActivationStore

    rng = np.random.default_rng(0)
    store = ActivationStore.create(
        path, n=n, layers={"near": 30, "far": 30}, batch_size=50, dtype="float32",
        attrs={"config": {"test": True}},
    )  # fmt: skip
    clean = rng.normal(size=(n, 30)).astype(np.float32)
    clean[: n // 2, :3] += 4
    far = clean + 10 * np.eye(30, dtype=np.float32)[0]
    with store.writer() as w:
        for b in range(2):
            s = slice(50 * b, 50 * b + 50)
            samples = {"index": np.arange(n)[s], "label": np.arange(n)[s] % 2,
                       "pred_clean": np.zeros(50), "pred_perturbed": np.ones(50),
                       "success": np.ones(50, bool), "norm": np.ones(50)}  # fmt: skip
            near = clean[s] + 0.05 * rng.normal(size=(50, 30))
            w.put(b, samples, {"near": (clean[s], near), "far": (clean[s], far[s])})
    return path


def test_bench_on_a_store_layer(tmp_path, capsys):
    store = _store(tmp_path / "run.zarr")
    out = tmp_path / "s.json"
    argv = ["bench", "tsne", "--engines", "opentsne", "--n", "200", *TINY, "--no-baseline"]
    assert cli([*argv, "--data", f"store:{store}:far", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "layer far" in result["data"]
    assert _rows(result)[("opentsne", 200)]["status"] == "ok"
    assert cli([*argv, "--data", f"store:{store}:nope", "--out", str(out)]) == 2
    assert "closest valid names" in capsys.readouterr().err


def test_bench_overlap_on_a_real_layer(tmp_path):
    pytest.importorskip("advlens.overlap")
    store = _store(tmp_path / "run.zarr")
    out = tmp_path / "o.json"
    argv = ["bench", "tsne", "--engines", "sklearn,opentsne", "--n", "200", "--data", "synthetic"]
    argv += [*TINY, "--no-baseline", "--overlap-store", str(store)]
    for layer, low, high in (("near", 0.8, 1.0), ("far", 0.0, 0.2)):
        assert cli([*argv, "--overlap-layer", layer, "--out", str(out)]) == 0
        ov = json.loads(out.read_text())["overlap"]
        assert ov["layer"] == layer and ov["n_points"] == 200
        values = [ov["engines"][e]["overlap"] for e in ("sklearn", "opentsne")]
        assert all(low <= v <= high for v in values), values
        assert abs(values[0] - values[1]) <= 0.1


# ------------------------------------------------------------------------------------ sweep


def _entry(n, overlaps, seconds):
    rows = [
        {"attack": "apgd-ce", "norm": norm, "layer": layer, "layer_index": i, "engine": "opentsne",
         "seed": 0, "perplexity": 30.0, "overlap": overlaps[norm][i],
         "calibrated": overlaps[norm][i] + 0.05, "ci_low": overlaps[norm][i] + 0.06 * (i == 0),
         "ci_high": overlaps[norm][i] + 0.1}
        for norm in overlaps for i, layer in enumerate(("input", "conv1", "fc"))
    ]  # fmt: skip
    timings = {"attack+extract": seconds, "reduce": seconds / 10, "embed": seconds / 2}
    return {"n": n, "run_dir": f"runs/sweep-t/n{n}", "wall_seconds": 2 * seconds,
            "timings": timings, "rows": rows}  # fmt: skip


def test_sweep_summary_table_and_plot(tmp_path):
    from advlens.sweep import parse_sizes, render_markdown, summarise, write_outputs

    assert parse_sizes("1000, 200,1_000") == [200, 1000]
    entries = [
        _entry(200, {"l2": [0.9, 0.5, 0.1], "linf": [0.95, 0.6, 0.2]}, 10.0),
        _entry(1000, {"l2": [0.92, 0.4, 0.1], "linf": [0.9, 0.65, 0.25]}, 50.0),
    ]
    summary = summarise(entries)
    assert summary["stages"] == ["attack+extract", "reduce", "embed"]
    conv1 = summary["overlap"]["apgd-ce-l2 | conv1 | opentsne s0 p30.0"]
    assert conv1["values"] == {"200": 0.5, "1000": 0.4}
    assert conv1["max_change"] == pytest.approx(0.1)
    out = {"name": "t", "folder": str(tmp_path), "sizes": entries, "summary": summary}
    md = render_markdown(out)
    assert "| 1000 | 50.0 | 5.0 | 25.0 | 100.0 |" in md
    assert "| apgd-ce-linf | fc | opentsne s0 p30.0 | 0.200 | 0.250 | 0.050 |" in md
    # the calibrated value per N with its interval, and the figure against N
    assert conv1["calibrated"] == {"200": [0.55, 0.5, 0.6], "1000": [pytest.approx(0.45), 0.4, 0.5]}
    assert (
        "| apgd-ce-l2 | conv1 | opentsne s0 p30.0 | 0.550 [0.500, 0.600] | 0.450 [0.400, 0.500] |"
        in md
    )
    assert "sweep-vs-n.png" in md
    paths = write_outputs(out, tmp_path)
    assert json.loads(paths[0].read_text())["summary"] == summary
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert paths[3].name == "sweep-vs-n.png" and paths[3].read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_bad_sizes(capsys):
    assert cli(["sweep", "--n", "100,abc"]) == 2
    assert "'abc' is not an integer" in capsys.readouterr().err


@pytest.mark.long
def test_sweep_runs_the_whole_analysis_at_each_size(tmp_path, fmnist_model):
    from pathlib import Path

    root = tmp_path / "runs"
    argv = ["sweep", "--quiet", "--n", "20,10", "--name", "t", "--set", f'output.root="{root}"']
    for setting in ("attack.n_iter=3", 'attack.norms=["linf"]', 'layers.select=["fc1"]',
                    "embed.n_iter=250", "overlap.bootstrap=0"):  # fmt: skip
        argv += ["--set", setting]
    assert cli(argv) == 0
    folder = root / "sweep-t"
    out = json.loads((folder / "sweep.json").read_text())
    assert [e["n"] for e in out["sizes"]] == [10, 20]
    for e in out["sizes"]:
        assert Path(e["run_dir"]) == folder / f"n{e['n']}"
        assert (Path(e["run_dir"]) / "metrics.json").exists()
        assert {"attack+extract", "reduce", "embed", "overlap"} <= set(e["timings"])
        assert {r["layer"] for r in e["rows"]} == {"input", "fc1"}
        assert all(r["n"] == e["n"] and 0.0 <= r["overlap"] <= 1.0 for r in e["rows"])
    assert "| 20 |" in (folder / "sweep.md").read_text()
    assert (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_data_has_exactly_the_asked_size_and_its_clusters():
    """No silent cut: any n gives n points (the old synthetic set stopped at 20,000)."""
    from advlens.bench import load_points, synthetic_clusters

    x, what = load_points("synthetic", seed=2, n=30_001)
    assert x.shape == (30_001, 50) and x.dtype == np.float32 and "30,001" in what
    x, labels = synthetic_clusters(5000, seed=2)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(10)])
    # each point is nearer its own cluster's mean than any other: the clusters are known
    d = ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    assert (d.argmin(axis=1) == labels).mean() > 0.99


def test_sizes_beyond_fashion_mnist_run_on_the_synthetic_mixture(tmp_path):
    """auto: Fashion-MNIST up to its 70,000 images, the synthetic mixture above; each row
    records the n it really ran and its data."""
    from advlens.bench import FMNIST_POINTS, data_for_size, run_bench

    assert data_for_size("auto", FMNIST_POINTS) == "fashion-mnist"
    assert data_for_size("auto", FMNIST_POINTS + 1) == "synthetic"
    assert data_for_size("synthetic", 10) == "synthetic"
    result = run_bench(engines=["opentsne"], sizes=[120, 200], data="synthetic", n_iter=250,
                       n_jobs=1, sample=100, baseline=False)  # fmt: skip
    assert [(r["n"], r["status"]) for r in result["results"]] == [(120, "ok"), (200, "ok")]
    assert all("Gaussian clusters in 50-D" in r["data"] for r in result["results"])
