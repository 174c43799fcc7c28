"""`advlens run` end to end on small inputs: sanity anchors, resume, configs, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from advlens.cli import main as cli
from advlens.config import load
from advlens.run import run

# Small but complete: every layer of the small CNN, both norms, the real attack and engine.
TINY = [
    "data.source=synthetic", "data.n=40", "attack.n_iter=5", "attack.batch_size=20",
    "embed.n_iter=300", "embed.n_jobs=1", "embed.pca_dims=10", "overlap.bootstrap=20",
]  # fmt: skip


def _cfg(tmp_path, *extra):
    return load(overrides=[*TINY, f"output.root='{tmp_path}'", *extra])


@pytest.fixture(scope="module")
def eps_zero(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eps0")
    cfg = _cfg(tmp, "attack.eps.linf=0.0", "attack.norms=['linf']", "output.name='eps0'")
    return cfg, run(cfg, progress=False)


@pytest.mark.long
def test_eps_zero_overlaps_on_every_layer(eps_zero):
    cfg, result = eps_zero
    assert [r["layer"] for r in result.rows] == result.layers
    assert result.layers[0] == "input" and len(result.layers) >= 6
    for row in result.rows:
        assert row["error"] is None
        assert row["calibrated"] >= 0.9, row  # k = "auto" is 1 at N = 40: raw chance is 1/2
        assert row["success_rate"] == 0.0
        for key in ("overlap", "mixing", "pair", "overlap_reduced", "auc"):
            assert 0.0 <= row[key] <= 1.0


@pytest.mark.long
def test_run_writes_the_promised_outputs(eps_zero):
    cfg, result = eps_zero
    d = result.run_dir
    for name in ("metrics.json", "metrics.csv", "provenance.json", "report.html",
                 "figures/layer_curve.png", "figures/maps-apgd-ce-linf.png"):  # fmt: skip
        assert (d / name).is_file(), name
    header, *lines = (d / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == len(result.layers)
    for col in ("layer", "norm", "eps", "engine", "k", "n", "success_rate", "overlap", "mixing",
                "pair", "overlap_reduced"):  # fmt: skip
        assert col in header.split(",")
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["config"] == cfg.to_dict()


@pytest.mark.long
def test_rerun_resumes_and_other_settings_are_refused(eps_zero, capsys):
    cfg, result = eps_zero
    again = run(cfg, progress=False)  # everything is done: read back, nothing recomputed
    assert [r["overlap"] for r in again.rows] == [r["overlap"] for r in result.rows]
    args = ["run", "--quiet", *sum((["--set", s] for s in TINY), [])]
    args += ["--set", f"output.root='{cfg.output.root}'", "--set", "output.name='eps0'"]
    args += ["--set", "attack.eps.linf=0.0", "--set", "attack.norms=['linf']"]
    assert cli([*args, "--set", "attack.n_iter=6"]) == 2
    err = capsys.readouterr().err
    assert "n_iter" in err and "--overwrite" in err and "Traceback" not in err


def test_far_shift_gives_no_overlap(tmp_path):
    # A "perturbation" far outside the data: the twins form their own cloud on every layer.
    from advlens.layer_task import LayerTask, run_layer_task
    from advlens.store import ActivationStore

    rng = np.random.default_rng(1)
    clean = rng.normal(size=(60, 8)).astype(np.float32)
    store = ActivationStore.create(tmp_path / "s.zarr", n=60, layers={"x": 8}, batch_size=60,
                                   dtype="float32", attrs={"config": {}})  # fmt: skip
    zeros = np.zeros(60)
    with store.writer() as w:
        w.put(0, {"index": np.arange(60), "label": zeros, "pred_clean": zeros,
                  "pred_perturbed": zeros, "success": zeros.astype(bool), "norm": zeros},
              {"x": (clean, clean + 1000.0)})  # fmt: skip
    cfg = _cfg(tmp_path)
    task = LayerTask(store=str(store.path), run_dir=str(tmp_path), attack="shift", norm="l2",
                     eps=1000.0, layer="x", layer_index=0, engine="opentsne", seed=0,
                     perplexity=30.0, embed=cfg.embed, overlap=cfg.overlap)  # fmt: skip
    assert run_layer_task(task)["overlap"] <= 0.05


def _tiny_cifar(folder, model, n=6):
    """A CIFAR-10 binary test batch labelled with the model's own predictions."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    with torch.no_grad():
        labels = model(torch.from_numpy(pixels.reshape(n, 3, 32, 32) / 255.0).float()).argmax(1)
    records = np.concatenate([labels.numpy().astype(np.uint8)[:, None], pixels], axis=1)
    records.tofile(folder / "test_batch.bin")


@pytest.mark.long
def test_cifar10_wrn28_10_config_end_to_end(tmp_path):
    from advlens.models.wrn import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=28, widen_factor=10).eval()
    torch.save(model.state_dict(), tmp_path / "wrn.pt")
    _tiny_cifar(tmp_path, model)
    cfg = load(
        Path(__file__).resolve().parent.parent / "configs" / "cifar10-wrn28-10.toml",
        [f"data.path='{tmp_path}'", f"model.checkpoint='{tmp_path / 'wrn.pt'}'", "data.n=4",
         "model.device=cpu", "attack.n_iter=2", "attack.batch_size=4", "attack.norms=['linf']",
         "layers.select=['conv1', 'fc']", "layers.include_input=false", "embed.engine=opentsne",
         "embed.n_iter=250", "embed.n_jobs=1", "overlap.k=3", "overlap.k_sweep=[3]",
         "overlap.bootstrap=0", f"output.root='{tmp_path}'"],
    )  # fmt: skip
    result = run(cfg, progress=False)
    assert [r["layer"] for r in result.rows] == ["conv1", "fc"]
    assert all(r["error"] is None and 0 <= r["overlap"] <= 1 for r in result.rows)
    assert result.rows[0]["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("layers.select=['conv9']", ["conv9", "conv1"]),
        ("data.source=fashion-mnist", ["apt-get install dataset-fashion-mnist"]),
        ("attack.eps.l2=-1", ["attack.eps.l2", ">= 0"]),
        ("attack.stepsize=3", ["unknown config key 'attack.stepsize'"]),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path, capsys, override, needles):
    extra = ["--set", "data.path='/nonexistent'"] if "fashion" in override else []
    code = cli(["run", "--quiet", *sum((["--set", s] for s in TINY), []),
                "--set", f"output.root='{tmp_path}'", "--set", override, *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.count("\n") <= 3, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.long
def test_provenance_records_clean_and_robust_accuracy(eps_zero):
    from advlens.run import _model_and_data

    cfg, result = eps_zero
    acc = json.loads((result.run_dir / "provenance.json").read_text())["accuracy"]
    model, data, device = _model_and_data(cfg)
    with torch.no_grad():
        pred = model(torch.as_tensor(data.images, device=device)).argmax(1).cpu().numpy()
    assert acc["n_split"] == len(data.labels)
    assert acc["clean"] == pytest.approx(float(np.mean(pred == data.labels)))
    # eps = 0: no attack succeeds, so robust accuracy is the clean accuracy
    assert acc["robust"] == {"apgd-ce linf": pytest.approx(acc["clean"])}
    assert "robust accuracy, apgd-ce linf" in (result.run_dir / "report.html").read_text()
