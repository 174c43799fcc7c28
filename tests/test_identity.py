"""A store's identity: settings that shape it and the model's content; finite values; gap pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advlens.cli import main as cli
from advlens.config import SHAPES, RunConfig, shaping_keys, store_identity

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

TINY = [
    "data.source=synthetic", "data.n=40", "attack.n_iter=2", "attack.batch_size=20",
    "attack.norms=['linf']", "layers.select=['fc1']", "layers.include_input=false",
    "embed.n_iter=250", "embed.n_jobs=1", "embed.pca_dims=10", "embed.perplexity=10",
    "overlap.bootstrap=0",
]  # fmt: skip


def _run(tmp_path, *extra):
    sets = sum((["--set", s] for s in [*TINY, f"output.root='{tmp_path}'", *extra]), [])
    return cli(["run", "--quiet", *sets])


@pytest.fixture
def checkpoint(tmp_path):
    from advlens.config import ModelConfig
    from advlens.models import build_model
    from advlens.train import ensure_weights

    ensure_weights(ModelConfig(device="cpu"), "synthetic")
    model = build_model(ModelConfig(device="cpu"), "synthetic", (1, 28, 28), 10)
    path = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_every_setting_declares_what_it_shapes():
    cfg = RunConfig()
    keys = [k for level in SHAPES for k in shaping_keys(cfg, level)]
    assert len(keys) == len(set(keys)) == sum(len(cfg.to_dict()[s]) for s in cfg.to_dict())
    ident = store_identity(cfg, "apgd-ce", "linf", 0.1)
    assert ident["attack"]["autocast_bf16"] is False and ident["attack"]["norm"] == "linf"
    assert "embed" not in ident and "schedule" not in ident and "root" not in ident["output"]


@pytest.mark.long
def test_replaced_weights_and_changed_attack_settings_are_refused(tmp_path, checkpoint, capsys):
    path, state = checkpoint
    ck = f"model.checkpoint='{path}'"
    assert _run(tmp_path, ck) == 0
    assert _run(tmp_path, ck) == 0  # the same settings resume (here: read back)
    capsys.readouterr()
    # Same path, other weights: refused, naming the difference.
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}, path)
    assert _run(tmp_path, ck) == 2
    err = capsys.readouterr().err
    assert "model.weights_sha256" in err and "--overwrite" in err and "Traceback" not in err
    torch.save(state, path)
    assert _run(tmp_path, ck, "attack.autocast_bf16=true") == 2
    assert "attack.autocast_bf16: False in the store, True now" in capsys.readouterr().err
    assert _run(tmp_path, ck, "attack.autocast_bf16=true", "output.overwrite=true") == 0


def test_nan_logits_are_refused_before_any_attack(tmp_path, checkpoint, capsys):
    path, state = checkpoint
    state = dict(state)
    state["logits.bias"] = torch.full_like(state["logits.bias"], float("nan"))
    torch.save(state, path)
    assert _run(tmp_path, f"model.checkpoint='{path}'") == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "of 200 samples" in err, err
    assert not list(tmp_path.rglob("*.zarr"))


def test_float16_overflow_suggests_float32(tmp_path, checkpoint, capsys):
    path, state = checkpoint
    state = dict(state)
    for key in ("fc1.1.weight", "fc1.1.bias"):
        state[key] = state[key] * 1e5
    torch.save(state, path)
    assert _run(tmp_path, f"model.checkpoint='{path}'", "overlap.k=5") == 2
    err = capsys.readouterr().err
    assert "layer 'fc1'" in err and "65504" in err and 'output.dtype = "float32"' in err, err


def test_gap_pooling_with_the_input_layer(tmp_path):
    from advlens.store import ActivationStore

    extra = ["layers.pool=gap", "layers.include_input=true", "layers.select=['conv1']"]
    assert _run(tmp_path, *extra) == 0
    store = ActivationStore.open(tmp_path / "default" / "apgd-ce-linf.zarr")
    assert store.widths == {"input": 784, "conv1": 16}  # the image is never pooled


def test_task_threads_are_pinned():
    # PCA's products differ between one and two BLAS threads; a task always gets one.
    from threadpoolctl import threadpool_limits

    from advlens.reduce import reduce
    from advlens.schedule import run_tasks

    x = np.maximum(np.random.default_rng(0).normal(size=(400, 1500)), 0).astype(np.float32)
    with threadpool_limits(1):
        one = reduce(x, 20, seed=0, device="cpu")
    with threadpool_limits(2):
        two = reduce(x, 20, seed=0, device="cpu")
        rows = run_tasks(_pca_task, [x], progress=False)
    if np.array_equal(one, two):
        pytest.skip("BLAS gives the same sums with one and two threads here")
    assert np.array_equal(rows[0]["y"], one)


def _pca_task(x):
    from advlens.reduce import reduce

    return {"y": reduce(x, 20, seed=0, device="cpu")}
