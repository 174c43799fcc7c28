"""Training and caching of the default small CNN (on synthetic data; Fashion-MNIST via the fixture)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from advlens.config import ModelConfig
from advlens.data import synthetic
from advlens.models import build_model
from advlens.train import ensure_trained, evaluate, train_small_cnn, weights_path


def ce_loss(model, ds) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(ds.images))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ds.labels)))


def test_training_learns_and_is_seeded():
    from advlens.models.small_cnn import SmallCNN

    train, test = synthetic(400, seed=1), synthetic(200, seed=0)
    torch.manual_seed(0)
    untrained = SmallCNN().eval()  # the same initial weights train_small_cnn starts from
    model, acc = train_small_cnn(train, test, epochs=2, seed=0, batch_size=32)
    assert acc == evaluate(model, test)
    assert acc > 0.8  # chance is 0.1
    assert ce_loss(model, test) < 0.5 * ce_loss(untrained, test)
    again, acc2 = train_small_cnn(train, test, epochs=2, seed=0, batch_size=32)
    assert acc2 == acc
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    other, _ = train_small_cnn(train, None, epochs=1, seed=1, batch_size=64)
    assert not torch.equal(other.logits.weight, model.logits.weight)


def test_ensure_trained_caches_plain_state_dict(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVLENS_CACHE", str(tmp_path))
    path = ensure_trained("synthetic", seed=0, epochs=1, progress=False)
    assert path == tmp_path / "models" / "small-cnn-synthetic-s0.pt" == weights_path("synthetic", 0)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["epochs"] == 1 and 0.0 <= meta["test_accuracy"] <= 1.0 and meta["seconds"] > 0
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert "conv1.0.weight" in state
    assert not list((tmp_path / "models").glob("*.tmp"))
    stamp = path.stat().st_mtime_ns
    assert ensure_trained("synthetic", seed=0, epochs=1, progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # cached: not trained again
    model = build_model(
        ModelConfig("small-cnn", train_epochs=1, device="cpu"), "synthetic", (1, 28, 28), 10
    )
    assert path.stat().st_mtime_ns == stamp
    test = synthetic(200, seed=0)
    assert evaluate(model, test) == pytest.approx(meta["test_accuracy"], abs=1e-6)
    ensure_trained("synthetic", seed=0, epochs=2, progress=False)  # other epochs: retrained
    assert json.loads(path.with_suffix(".json").read_text())["epochs"] == 2


def test_train_cli(tmp_path, monkeypatch, capsys):
    from advlens import train

    monkeypatch.setenv("ADVLENS_CACHE", str(tmp_path))
    assert train.__doc__ and "Examples:" in train.__doc__
    parser = argparse.ArgumentParser()
    train.configure(parser)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(["--dataset", "synthetic", "--epochs", "1", "--quiet"])
    assert train.main(args) == 0
    assert "small-cnn (trained)" in capsys.readouterr().out
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "small-cnn (cached)" in out and "small-cnn-synthetic-s0.pt" in out


@pytest.mark.slow
def test_default_model_reaches_88_percent(fmnist_model):
    """The cached default model (trained once per machine by `advlens train`)."""
    model, test = fmnist_model
    acc = evaluate(model, test)
    assert acc >= 0.88
    meta = json.loads(weights_path("fashion-mnist", 0).with_suffix(".json").read_text())
    assert abs(meta["test_accuracy"] - acc) < 1e-6
    assert np.all(test.images >= 0) and test.images.shape == (10000, 1, 28, 28)
