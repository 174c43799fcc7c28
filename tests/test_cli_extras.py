"""The researcher's command line: fractions and norm names in settings, `advlens config`,
`advlens export --projector` (read back by TensorBoard's own parser), `advlens compare`,
`layers --checkpoint`, progress within an attack batch, log lines beside bars, defaults."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from advlens import progress
from advlens.cli import build_parser
from advlens.cli import main as cli
from advlens.config import RunConfig, load
from advlens.errors import ConfigError

TINY = [
    "data.source=synthetic", "data.n=20", "attack.n_iter=4", "attack.batch_size=20",
    "attack.norms=linf", "attack.eps.linf=0.1", "embed.n_iter=250", "embed.n_jobs=1",
    "embed.pca_dims=8", "overlap.bootstrap=10", 'layers.select=["fc1"]',
]  # fmt: skip


# ---------------------------------------------------------------- settings
@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_eps_fractions_equal_their_value(num, den):
    cfg = load(overrides=[f"attack.eps.linf={num}/{den}"])
    assert cfg.attack.eps["linf"] == num / den


def test_fractions_in_toml_and_norms_in_any_case(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[attack]\nnorms = ["Linf", "L2"]\neps = { LINF = "8/255", l2 = "1 / 2" }\n')
    cfg = load(toml)
    assert cfg.attack.norms == ("linf", "l2")
    assert cfg.attack.eps == {"linf": 8 / 255, "l2": 0.5}
    assert cfg.attack.eps_for("Linf", "cifar10") == 8 / 255
    assert load(overrides=["attack.norms=Linf"]).attack.norms == ("linf",)
    with pytest.raises(ConfigError, match="attack.eps.linf = '8/0'.*fraction"):
        load(overrides=["attack.eps.linf=8/0"])
    with pytest.raises(ConfigError, match="'Lmax'"):
        load(overrides=["attack.norms=Lmax"])


def test_config_command_lists_every_key_with_default_type_and_meaning(capsys):
    from advlens.configdoc import toml_value

    assert cli(["config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if "." in ln[:30]}
    defaults = RunConfig()
    n_keys = 0
    for section in fields(RunConfig):
        part = getattr(defaults, section.name)
        for f in fields(part):
            n_keys += 1
            line = lines[f"{section.name}.{f.name}"]
            key, default, typ, *meaning = line.split(None, 3)
            assert default == toml_value(getattr(part, f.name)).split()[0]
            assert meaning and meaning[0].strip(), f"{key} has no one-line meaning"
    assert n_keys == len(lines) >= 50
    assert cli(["config", "--set", "attack.eps.linf=8/255"]) == 0
    out = capsys.readouterr().out
    assert f"linf = {8 / 255!r}}}" in out  # the value column


def test_bench_tsne_has_a_default_out():
    args = build_parser().parse_args(["bench", "tsne"])
    assert args.out == "bench-tsne.json"


# ---------------------------------------------------------------- layers --checkpoint
def test_layers_checkpoint_is_validated(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        from my_model import build
    finally:
        sys.path.pop(0)
    from advlens.models.small_cnn import SmallCNN

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(SmallCNN().state_dict(), good)
    torch.save(build().state_dict(), bad)
    assert cli(["layers", "--model", "small-cnn", "--checkpoint", str(good)]) == 0
    assert "fits small-cnn" in capsys.readouterr().out
    assert cli(["layers", "--model", "small-cnn", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "missing" in err and "Traceback" not in err
    assert cli(["layers", "--model", "small-cnn", "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- progress
def test_progress_moves_per_attack_iteration():
    from advlens.attacks import get_attack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(12, 1, 4, 4)
    y = model(x).argmax(1)  # all correctly classified: every sample is attacked
    attack = get_attack("apgd-ce", "linf", 0.1, n_iter=10)
    assert progress.expected_forwards(attack) == 10
    pb = progress.Progress(total=12, enabled=False)
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(pb.n))
    with progress.forward_ticks(model, pb, 12, progress.expected_forwards(attack)) as ticks:
        attack(model, x, y, seed=0)
    during = sorted(set(seen))
    assert len(during) >= 5 and 0 < during[1] < 12 and max(during) <= 11
    assert seen == sorted(seen)  # never backwards
    pb.update(ticks.left)
    assert pb.n == 12
    # the hook is gone: later forward passes do not move the bar
    model(x)
    assert pb.n == 12


def test_log_lines_do_not_break_a_progress_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    handler = logging.StreamHandler(tty)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress.redirect_logging():
            with progress.bar(total=4, desc="attack+extract", unit="img") as pb:
                pb.update(1)
                logging.getLogger("advlens.test").warning("a line in the middle")
                pb.update(3)
    finally:
        root.removeHandler(handler)
    text = tty.getvalue()
    pieces = [p.strip() for p in text.replace("\r", "\n").split("\n")]
    assert "a line in the middle" in pieces  # alone on its line, not glued to the bar
    assert "attack+extract" in text and "4/4" in text


# ---------------------------------------------------------------- export
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from advlens.run import run

    root = tmp_path_factory.mktemp("export")
    cfg = load(overrides=[*TINY, f"output.root='{root}'", "output.name=r"])
    return run(cfg, progress=False)


def test_projector_export_reads_back_with_tensorboards_parser(tiny_run, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (the test extra)")
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins.projector import projector_config_pb2

    from advlens.report.tables import load_maps
    from advlens.store import ActivationStore

    out = tmp_path / "proj"
    assert cli(["export", str(tiny_run.run_dir), "--projector", str(out)]) == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    config = text_format.Parse(
        (out / "projector_config.pbtxt").read_text(), projector_config_pb2.ProjectorConfig()
    )
    store = ActivationStore.open(tiny_run.run_dir / "apgd-ce-linf.zarr")
    samples = store.samples()
    n = len(samples["label"])
    maps = {
        m.row["layer"]: m for m in load_maps(tiny_run.run_dir, tiny_run.rows)[("apgd-ce", "linf")]
    }
    assert len(config.embeddings) == 2 * len(tiny_run.layers)  # PCA points and t-SNE map
    classes = json.loads((tiny_run.run_dir / "provenance.json").read_text())["dataset"]["classes"]
    for e in config.embeddings:
        layer = e.tensor_name.split(" ")[2]
        shape = tuple(e.tensor_shape)
        arr = np.fromfile(out / e.tensor_path, dtype="<f4")
        assert arr.size == math.prod(shape) and shape[0] == 2 * n
        if "t-SNE" in e.tensor_name:
            np.testing.assert_allclose(arr.reshape(shape), maps[layer].xy, rtol=1e-6)
        else:
            assert shape[1] == 8  # embed.pca_dims
        rows = (out / e.metadata_path).read_text().splitlines()
        head, body = rows[0].split("\t"), [r.split("\t") for r in rows[1:]]
        assert len(body) == shape[0]
        assert head[:4] == ["point", "label", "prediction", "success"]
        assert [b[0] for b in body] == ["clean"] * n + ["perturbed"] * n
        assert [b[1] for b in body[:n]] == [classes[c] for c in samples["label"]]
        assert [b[2] for b in body[n:]] == [classes[c] for c in samples["pred_perturbed"]]
        assert [b[3] for b in body[n:]] == [str(bool(s)) for s in samples["success"]]
        overl = [b[6] == "True" for b in body]
        assert overl == list(maps[layer].per_point > 0.5)
        sprite = Image.open(out / e.sprite.image_path)
        side = math.ceil(math.sqrt(2 * n))
        w, h = e.sprite.single_image_dim
        assert sprite.size == (side * w, side * h) == (side * 28, side * 28)
        first = np.asarray(sprite.convert("L"))[:28, :28] / 255.0
        clean0 = store.read_layer("input", "clean")[0].reshape(28, 28).astype(float)
        np.testing.assert_allclose(first, clean0, atol=1 / 255 + 1e-3)
    with pytest.raises(ConfigError, match="'fc2'"):
        from advlens.export import export_projector

        export_projector(tiny_run.run_dir, tmp_path / "p2", layers=["fc2"])
    assert cli(["export", str(tiny_run.run_dir), "--projector", str(tmp_path / "p3"),
                "--layer", "fc1", "--norm", "Linf"]) == 0  # fmt: skip
    one = (tmp_path / "p3" / "projector_config.pbtxt").read_text()
    assert one.count("embeddings {") == 2 and "fc1" in one and "input" not in one


# ---------------------------------------------------------------- compare
def _write_run(root: Path, name: str, layers, *, n: int, eps: float, shift: float) -> Path:
    from advlens.report.tables import write_metrics

    rows = []
    for i, layer in enumerate(layers):
        for norm in ("l2", "linf"):
            ov = max(0.0, 1.0 - shift * i - (0.1 if norm == "linf" else 0.0))
            rows.append({
                "attack": "apgd-ce", "norm": norm, "eps": eps if norm == "linf" else 1.5,
                "layer": layer, "layer_index": i, "engine": "opentsne", "seed": 0,
                "perplexity": 30.0, "k": 10, "n": n, "success_rate": 0.9, "overlap": ov,
                "mixing": ov, "pair": ov, "overlap_reduced": ov, "auc": 0.9,
                "ci_low": max(0.0, ov - 0.05), "ci_high": min(1.0, ov + 0.05), "error": None,
            })  # fmt: skip
    (root / name).mkdir()
    write_metrics(root / name, rows, list(layers))
    return root / name


def test_compare_aligns_by_name_warns_and_styles_runs(tmp_path, monkeypatch, caplog):
    from advlens.report import compare as cmp
    from advlens.report import figures as F

    a = _write_run(tmp_path, "a", ["input", "conv1", "fc1", "logits"], n=100, eps=0.1, shift=0.2)
    b = _write_run(tmp_path, "b", ["conv1", "fc1", "logits"], n=50, eps=0.2, shift=0.3)
    drawn = {}
    real = F.plot_series

    def keep(series, layers, out, **kw):  # the real plot, with its inputs kept for the test
        drawn["series"], drawn["layers"] = list(series), list(layers)
        return real(series, layers, out, **kw)

    monkeypatch.setattr(F, "plot_series", keep)
    caplog.set_level(logging.WARNING, logger="advlens.report.compare")
    out = cmp.compare([a, b], tmp_path / "cmp")
    assert drawn["layers"] == ["input", "conv1", "fc1", "logits"]
    by = {s.label.split(" ")[0] + s.extra["norm"]: s for s in drawn["series"]}
    sa, sb = by["a:linf"], by["b:linf"]
    assert np.isnan(sb.y[0])  # b has no input layer: aligned by name, not by position
    np.testing.assert_allclose(sb.y[1:], [0.9, 0.6, 0.3])
    np.testing.assert_allclose(sa.y, [0.9, 0.7, 0.5, 0.3])
    assert sa.linestyle != sb.linestyle and sa.marker != sb.marker
    np.testing.assert_allclose(sb.lo[1:], sb.y[1:] - 0.05)  # the per-map interval as band
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "runs differ in N: a=100, b=50" in text
    assert "runs differ in eps (apgd-ce linf): a=0.1, b=0.2" in text
    assert "differ in k" not in text
    import csv

    with open(out["compare.csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    row = next(r for r in table if r["run"] == "b" and r["layer"] == "fc1" and r["norm"] == "l2")
    assert float(row["ci_low"]) == pytest.approx(0.65) and row["n"] == "50"
    # one norm only (an eps sweep): runs differ by shade and by line style
    for run in (a, b):
        rows = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(
            json.dumps({**rows, "rows": [r for r in rows["rows"] if r["norm"] == "linf"]})
        )
    cmp.compare([a, b], tmp_path / "cmp1")
    sa, sb = drawn["series"]
    assert sa.color != sb.color and sa.linestyle != sb.linestyle
