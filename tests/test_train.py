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


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    from advlens.train import AdvRecipe, pgd_linf

    train = synthetic(300, seed=1, noise=0.3)
    model, _ = train_small_cnn(train, None, epochs=1, seed=0, batch_size=32)
    x, y = torch.from_numpy(train.images[:64]), torch.from_numpy(train.labels[:64])
    loss = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    adv = pgd_linf(model, x, y, AdvRecipe(eps=0.05, steps=5), loss)
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert loss(model(adv), y) > loss(model(x), y)


def test_adversarial_model_is_cached_under_its_recipe(tmp_path, monkeypatch):
    from advlens.errors import ConfigError
    from advlens.train import AdvRecipe

    monkeypatch.setenv("ADVLENS_CACHE", str(tmp_path))
    recipe = AdvRecipe("pgd-linf", eps=0.1, steps=2)
    path = ensure_trained("synthetic", seed=0, epochs=1, progress=False, adversarial=recipe)
    assert path.name == "small-cnn-synthetic-s0-pgd-linf-e0.1-k2.pt" != weights_path("synthetic")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["adversarial"] == {"method": "pgd-linf", "eps": 0.1, "steps": 2}
    stamp = path.stat().st_mtime_ns
    cfg = ModelConfig("small-cnn", train_epochs=1, device="cpu", adversarial="pgd-linf",
                      adversarial_eps=0.1, adversarial_steps=2)  # fmt: skip
    build_model(cfg, "synthetic", (1, 28, 28), 10)
    assert path.stat().st_mtime_ns == stamp  # the config finds the cached robust model
    assert not weights_path("synthetic").exists()  # the standard one is another file
    assert ModelConfig(adversarial="none").adversarial is None
    with pytest.raises(ConfigError, match="valid methods are pgd-linf"):
        ModelConfig(adversarial="fgsm")
    with pytest.raises(ConfigError, match="0 < eps < 1"):
        ModelConfig(adversarial="pgd-linf", adversarial_eps=2.0)


def _deep_calibrated_share(model, x, y, eps: float) -> dict[str, float]:
    """The default statistic (calibrated ``share``, k = "auto", on the 50-D PCA points t-SNE
    would embed) at fc1 and logits after PGD at eps."""
    from advlens.overlap import overlap_highdim
    from advlens.reduce import reduce
    from advlens.train import AdvRecipe, pgd_linf

    torch.manual_seed(1)
    adv = pgd_linf(model, x, y, AdvRecipe(eps=eps, steps=10), torch.nn.CrossEntropyLoss())
    out = {}
    with torch.no_grad():
        for name, batch in (("clean", x), ("adv", adv)):
            h = model.fc1(model.pool2(model.conv2(model.pool1(model.conv1(batch)))))
            out[name] = {"fc1": h.numpy(), "logits": model.logits(h).numpy()}
    n = len(x)
    vals = {}
    for layer in ("fc1", "logits"):
        z = reduce(np.concatenate([out["clean"][layer], out["adv"][layer]]), 50, seed=0)
        share = overlap_highdim(z, np.repeat([False, True], n), k="auto", variant="share")
        vals[layer] = share.calibrated
    with torch.no_grad():
        vals["success"] = float((model(adv).argmax(1) != y).float().mean())
    return vals


@pytest.mark.slow
def test_robust_model_keeps_deep_layers_overlapping():
    """A small setting of the robust-vs-standard comparison: Fashion-MNIST subsets, 3 epochs,
    PGD-3 adversarial training at eps 0.1, the same PGD-10 attack at eps 0.1 on both."""
    from advlens.data import FASHION_MNIST_DIR, load_dataset
    from advlens.train import AdvRecipe

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    train = load_dataset("fashion-mnist", split="train").subset(np.arange(3000))
    test = load_dataset("fashion-mnist", split="test").subset(np.arange(600))
    vals = {}
    for name, recipe in (("standard", None), ("robust", AdvRecipe("pgd-linf", 0.1, 3))):
        model, _ = train_small_cnn(train, None, epochs=3, seed=0, adversarial=recipe)
        x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
        with torch.no_grad():
            ok = (model(x).argmax(1) == y).numpy()
        vals[name] = _deep_calibrated_share(model, x[ok][:300], y[ok][:300], eps=0.1)
    # measured: standard fc1 0.52, logits 0.57 (attack success 0.47); robust 0.65, 0.70 (0.25)
    for layer in ("fc1", "logits"):
        assert vals["robust"][layer] > vals["standard"][layer], (layer, vals)


def test_robust_vs_standard_config():
    from pathlib import Path

    from advlens.config import load

    path = Path(__file__).resolve().parent.parent / "configs" / "robust-vs-standard.toml"
    robust = load(path)
    assert robust.model.adversarial == "pgd-linf" and robust.model.adversarial_steps == 7
    assert robust.attack.norms == ("linf",) and robust.overlap.k == "auto"
    standard = load(path, ["model.adversarial=none", "output.name=standard"])
    assert standard.model.adversarial is None and standard.output.name == "standard"
