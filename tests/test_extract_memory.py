"""Extraction memory: sub-batched attacks and taps give the whole batch's output, the sub-batch
follows the budget (``attack.memory_mb``) and the budget is checked before any work."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from advlens.attacks import chunks, get_attack
from advlens.config import load
from advlens.data import synthetic
from advlens.errors import ConfigError
from advlens.extract import GRAD_FACTOR, extract, plan_queue, plan_sub_batch
from advlens.models.taps import activation_values, catalog, select_layers
from advlens.store import ActivationStore


def tiny_model() -> nn.Module:
    # Small products (K <= 128): their rows round the same in any number of rows on this CPU,
    # so the comparison below can be exact.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def labelled(n: int, model: nn.Module):
    data = synthetic(n=n, shape=(1, 8, 8), seed=1)
    with torch.no_grad():  # label = prediction: every sample is attacked
        pred = model(torch.from_numpy(data.images)).argmax(1).numpy()
    return replace(data, labels=pred)


@pytest.mark.parametrize("norm, eps", [("linf", 0.5), ("l2", 4.0), ("l1", 16.0)])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t"])
def test_sub_batched_attack_equals_the_whole_batch(name, norm, eps):
    model = tiny_model()
    data = labelled(40, model)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    extra = {"n_target_classes": 3} if name == "apgd-t" else {}
    whole = get_attack(name, norm, eps, n_iter=12, seed=5, **extra)(model, x, y)
    for sub in (8, 16):
        parts = get_attack(name, norm, eps, n_iter=12, seed=5, sub_batch=sub, **extra)(model, x, y)
        for key in ("x_adv", "success", "norm", "pred_clean", "pred_adv"):
            assert torch.equal(getattr(parts, key), getattr(whole, key)), (sub, key)
    assert bool(whole.success.any())  # the attack did something to compare


def test_sub_batches_keep_the_random_stream():
    """The random starts are drawn for the whole batch once: a sub-batch's start is the slice
    of the whole batch's start, not a fresh draw (which would repeat the first rows' noise)."""
    attack = get_attack("apgd-ce", "linf", 0.1, n_iter=3, sub_batch=4)
    x = torch.full((10, 1, 8, 8), 0.5)
    gen = torch.Generator().manual_seed(9)
    starts = attack._init(x, gen)
    seen = []
    attack_probe = replace(attack)
    attack_probe.__dict__["_single_run"] = lambda _m, xs, _y, _t, x0: (
        seen.append(x0) or (x0, torch.zeros(len(xs), dtype=torch.bool), torch.zeros(len(xs)))
    )
    attack_probe._run_chunks(None, x, torch.zeros(10, dtype=torch.long), None,
                             torch.Generator().manual_seed(9))  # fmt: skip
    assert [len(s) for s in seen] == [4, 4, 2]
    assert torch.equal(torch.cat(seen), starts)
    assert not torch.equal(seen[0], seen[1])


def _store(path, model, data, layers, widths):
    return ActivationStore.create(
        path, n=len(data.labels), layers=widths, batch_size=16, dtype="float32",
        attrs={"config": {}, "model": "tiny", "dataset": data.name},
    )  # fmt: skip


def test_extract_in_sub_batches_stores_the_same_bytes(tmp_path):
    # Batches of 16 in sub-batches of 8: every product sees whole blocks of 8 rows. (A ragged
    # last sub-batch may round differently: hence the sub-batch is part of a store's identity.)
    model = tiny_model()
    data = labelled(48, model)
    infos = catalog(model, data.images.shape[1:])
    layers = select_layers(infos, ["all"], include_input=True)
    widths = {i.name: i.size for i in infos if i.name in layers}
    stores = []
    for sub in (None, 8):
        attack = get_attack("apgd-ce", "l2", 0.5, n_iter=8, seed=2, sub_batch=sub)
        store = _store(tmp_path / f"s{sub}.zarr", model, data, layers, widths)
        extract(model, data, attack, store, layers, device="cpu", progress=False, sub_batch=sub,
                max_queue=1)  # fmt: skip
        stores.append(store)
    for name in layers:
        for which in ("clean", "perturbed"):
            a, b = (s.read_layer(name, which) for s in stores)
            assert np.array_equal(a, b), (name, which)
    for key, value in stores[0].samples().items():
        assert np.array_equal(value, stores[1].samples()[key]), key


def test_activation_values_counts_in_place_outputs_once():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten())
    # conv output (4 x 8 x 8); the in-place ReLU shares it; Flatten is a view of it too
    assert activation_values(model, (1, 8, 8)) == 4 * 8 * 8
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    assert activation_values(model, (1, 8, 8)) == 2 * 4 * 8 * 8 + 4 * 4 * 4


def test_plan_sub_batch_follows_the_budget():
    model = tiny_model()
    per_image = GRAD_FACTOR * 4 * activation_values(model, (1, 8, 8))
    assert plan_sub_batch(model, (1, 8, 8), 250, 0) is None  # no budget: whole batches
    assert plan_sub_batch(model, (1, 8, 8), 250, 1024) is None  # a whole batch fits
    # a budget that fits 20.5 images in its half gives 16 (a multiple of 8)
    mb = int(np.ceil(2 * 20.5 * per_image / 2**20 * 1e6)) / 1e6
    sub = plan_sub_batch(model, (1, 8, 8), 10_000, mb)
    assert sub == 16
    assert plan_sub_batch(model, (1, 8, 8), 10_000, 2 * 3 * per_image / 2**20) == 3
    assert plan_sub_batch(model, (1, 8, 8), 10_000, 1e-9) == 1  # never below one image
    assert plan_queue(100 * 2**20, 0) == 4
    assert plan_queue(100 * 2**20, 400) == 2
    assert plan_queue(100 * 2**20, 10) == 1


def test_chunks_cover_the_rows():
    assert chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunks(10, None) == [slice(0, 10)]
    assert chunks(0, 3) == [slice(0, 0)]


@pytest.mark.parametrize("value", ["-1", "1.5", "true", '"lots"'])
def test_memory_budget_is_checked_at_load(value):
    with pytest.raises(ConfigError, match="attack.memory_mb"):
        load(None, [f"attack.memory_mb={value}"])


def test_sub_batch_is_checked():
    with pytest.raises(ConfigError, match="sub_batch"):
        get_attack("apgd-ce", "linf", 0.1, sub_batch=0)
