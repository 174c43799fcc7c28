"""The Python API (advlens.analyze, load_run, Result) against `advlens run`, and the README.

One small run through each door with the same settings: the tables must agree row for row
(timings and task ids aside, which name the folder and the clock).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from matplotlib.figure import Figure

import advlens
from advlens.cli import main as cli
from advlens.config import ModelConfig
from advlens.data import synthetic
from advlens.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LAYERS = ["conv1", "fc1"]
# the same run for advlens.analyze (keywords) and advlens run (--set)
SETTINGS = {
    "data.n": 30, "attack.norms": "linf", "attack.eps.linf": 0.1, "attack.n_iter": 5,
    "attack.batch_size": 15, "embed.n_iter": 250, "embed.n_jobs": 1, "embed.pca_dims": 10,
    "embed.engine": "auto", "overlap.bootstrap": 20,
}  # fmt: skip
VOLATILE = ("task_id", "seconds_", "engine_seconds", "worker")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def small_model():
    from advlens.models import build_model

    # small-cnn on the synthetic source is trained in seconds and cached like the default
    from advlens.train import ensure_weights

    cfg = ModelConfig(name="small-cnn", device="cpu")
    ensure_weights(cfg, "synthetic")
    model = build_model(cfg, "synthetic", (1, 28, 28), 10)
    return model, synthetic(n=200, seed=0)  # = load_dataset("synthetic", "test")


@pytest.fixture(scope="module")
def both(small_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    model, test = small_model
    api = advlens.analyze(
        model, torch.from_numpy(test.images), test.labels, layers=LAYERS, norm="linf",
        eps=0.1, n=30, engine="auto", out=tmp / "api", progress=False,
        attack__n_iter=5, attack__batch_size=15, embed__n_iter=250, n_jobs=1, pca_dims=10,
        bootstrap=20,
    )  # fmt: skip
    args = ["run", "--quiet", "--set", "data.source=synthetic", "--set", "model.name=small-cnn"]
    args += ["--set", f"layers.select={json.dumps(LAYERS)}", "--set", f"output.root='{tmp}'"]
    args += ["--set", "output.name=cli"]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    assert cli(args) == 0
    return api, tmp / "cli", args


def test_api_gives_the_table_of_advlens_run(both):
    api, cli_dir, _ = both
    cli_rows = json.loads((cli_dir / "metrics.json").read_text())["rows"]
    assert [r["layer"] for r in api.table] == ["input", *LAYERS]
    assert _stable(api.table) == _stable(cli_rows)
    for r in api.table:
        assert r["error"] is None and r["n"] == 30 and r["eps"] == 0.1 and r["norm"] == "linf"
    # the API's table is its own metrics.json, not a copy that could drift
    assert api.table == json.loads((api.run_dir / "metrics.json").read_text())["rows"]
    prov = api.provenance
    assert prov["model"]["name"] == "SmallCNN (in memory)"
    assert prov["config"]["model"]["checkpoint"].startswith("sha1:")


def test_load_run_round_trips(both, tmp_path):
    api, _, _ = both
    again = advlens.load_run(api.run_dir)
    assert again == api  # dataclass equality: folder, table, layers and provenance
    assert again.layers == ["input", *LAYERS]
    fig = again.plot()
    assert isinstance(fig, Figure)
    (line,) = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    np.testing.assert_allclose(line.get_ydata(), [r["overlap"] for r in api.table])
    m = again.points("fc1")
    assert m.xy.shape == (60, 2) and m.is_perturbed.sum() == 30
    fig = again.map("fc1")
    offsets = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    assert sorted(map(tuple, offsets)) == sorted(map(tuple, m.xy))
    with pytest.raises(ConfigError, match="fc1"):
        again.map("fc2")
    html = again._repr_html_()
    assert all(f"<td>{name}</td>" in html for name in again.layers)
    out = again.report(tmp_path / "r.html")
    assert out.read_bytes() == (api.run_dir / "report.html").read_bytes()
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(advlens.AdvlensError, match="pip install pandas"):
            again.to_pandas()
    else:
        assert list(again.to_pandas()["overlap"]) == [r["overlap"] for r in api.table]


def test_rerun_with_other_weights_is_refused(both, small_model):
    api, _, _ = both
    model, test = small_model
    changed = __import__("copy").deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    kw = dict(layers=LAYERS, eps=0.1, n=30, out=api.run_dir, progress=False,
              attack__n_iter=5, attack__batch_size=15)  # fmt: skip
    with pytest.raises(advlens.AdvlensError, match="checkpoint"):
        advlens.analyze(changed, test.images, test.labels, **kw)


def test_dry_run_lists_stores_layers_tasks_and_their_size(both, capsys, tmp_path):
    _, cli_dir, args = both
    assert cli([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    store = zarr.open_group(str(cli_dir / "apgd-ce-linf.zarr"), mode="r")
    # oracle: the bytes of the layer arrays the real run created, uncompressed
    nbytes = sum(
        a.nbytes for name, a in store.members(max_depth=None)
        if isinstance(a, zarr.Array) and name.startswith("layers/")
    )  # fmt: skip
    assert nbytes > 0
    assert "apgd-ce-linf.zarr" in out and "(exists" in out
    for layer in ("input", *LAYERS):
        assert re.search(rf"^  {re.escape(layer)}\s", out, re.M), layer
    assert "layer tasks: 3 = 1 stores x 3 layers" in out and "3 already done" in out
    size = re.search(r"at most ([\d.]+) (kB|MB) each", out)
    scale = {"kB": 1e3, "MB": 1e6}[size.group(2)]
    assert float(size.group(1)) * scale == pytest.approx(nbytes, rel=0.01)
    # a dry run of a new folder writes nothing
    fresh = [a if "output.root" not in a else f"output.root='{tmp_path}/new'" for a in args]
    assert cli([*fresh, "--dry-run"]) == 0
    assert "(new)" in capsys.readouterr().out and not (tmp_path / "new").exists()


def test_api_checks_its_inputs(small_model, tmp_path):
    model, test = small_model
    x, y = test.images, test.labels
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        advlens.analyze(model, x * 255, y, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="labels must be 200 integers"):
        advlens.analyze(model, x, y[:10], out=tmp_path / "a")
    with pytest.raises(ConfigError, match="attack__n_iter or embed__n_iter"):
        advlens.analyze(model, x, y, n_iter=3, out=tmp_path / "a")
    with pytest.raises(
        ConfigError, match=r"attack__n_restart'; closest valid names .*: n_restarts"
    ):
        advlens.analyze(model, x, y, attack__n_restart=3, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="labels only with image arrays"):
        advlens.analyze(model, "synthetic", y, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="torch.nn.Module or a model name, got ndarray"):
        advlens.analyze(x, x, y, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_model_data_mismatch_names_both_shapes_and_leaves_no_folder(small_model, tmp_path):
    model, _ = small_model
    rgb = np.random.default_rng(0).random((20, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ConfigError) as err:
        advlens.analyze(model, rgb, np.arange(20) % 10, out=tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "(1, 3, 32, 32)" in msg and "SmallCNN" in msg and "forward pass fails" in msg
    assert not (tmp_path / "run").exists()


def test_cli_user_model_from_the_current_directory(tmp_path, monkeypatch, capsys):
    from PIL import Image

    # RGB images for a 1-channel model: the error names both, and no run folder is left
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (40 * i, 90 * c, 10)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(EXAMPLES))])
    args = ["run", "--quiet", "--set", "model.name=my_model:build", "--set", "data.source=folder"]
    args += ["--set", f"data.path='{tmp_path / 'data'}'", "--set", f"output.root='{tmp_path}/r'"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "my_model:build" in err and "(1, 3, 12, 12)" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.long
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    exec(compile(_readme_example(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "results in" in out and "head.3" in out
    for name in ("curve.png", "head.png", "report.html", "runs/my-model/metrics.json"):
        assert (tmp_path / name).is_file(), name
