"""Layers that are the same tensor (WRN's block1 and block1.layer.3) are stored once."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import advlens
from advlens.data import synthetic
from advlens.errors import ConfigError, StoreError
from advlens.models.taps import catalog, layer_aliases, tap_forward
from advlens.store import ActivationStore


class Aliased(nn.Module):
    """``stem`` returns the output of ``stem.1`` (the same tensor, like WRN's block1); the
    in-place ReLU ``stem.1`` shares ``stem.0``'s storage but changes it: no alias there."""

    advlens_taps = ("stem.0", "stem.1", "stem", "head")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x):
        return self.head(self.stem(x))


def test_catalog_finds_the_same_tensor_and_not_an_in_place_change():
    cat = {i.name: i for i in catalog(Aliased().eval(), (1, 8, 8))}
    assert cat["stem"].alias_of == "stem.1"
    assert cat["stem.1"].alias_of is None  # in place: same storage, other values
    assert cat["stem.0"].alias_of is None and cat["head"].alias_of is None
    infos = list(cat.values())
    assert layer_aliases(infos, ["input", "stem.0", "stem.1", "stem", "head"]) == {"stem": "stem.1"}
    assert layer_aliases(infos, ["stem.0", "stem"]) == {}  # its twin is not selected


def test_tap_forward_returns_the_layer_once_and_checks_the_alias():
    model = Aliased().eval()
    x = torch.rand(5, 1, 8, 8)
    _, acts = tap_forward(model, x, ["stem.0", "stem.1", "stem"])
    assert torch.equal(acts["stem"], acts["stem.1"])
    assert not torch.equal(acts["stem.0"], acts["stem.1"])  # the hook copied before the ReLU
    _, once = tap_forward(model, x, ["stem.1", "stem"], aliases={"stem": "stem.1"})
    assert list(once) == ["stem.1"] and torch.equal(once["stem.1"], acts["stem.1"])
    with pytest.raises(ConfigError, match="alias of 'stem.0'"):
        tap_forward(model, x, ["stem.0", "stem"], aliases={"stem": "stem.0"})


def _create(path, **kw):
    return ActivationStore.create(path, n=6, layers={"a": 4, "b": 4, "c": 2}, batch_size=3,
                                  dtype="float32", attrs={"config": {}}, **kw)  # fmt: skip


def test_store_keeps_one_array_and_readers_resolve_the_alias(tmp_path):
    store = _create(tmp_path / "s.zarr", aliases={"b": "a"})
    rng = np.random.default_rng(0)
    data = {k: rng.random((6, w), dtype=np.float32) for k, w in (("a", 4), ("c", 2))}
    samples = {"index": np.arange(3), "label": np.zeros(3), "pred_clean": np.zeros(3),
               "pred_perturbed": np.ones(3), "success": np.ones(3, bool), "norm": np.ones(3)}  # fmt: skip
    with store.writer() as w:
        for b in range(2):
            rows = slice(3 * b, 3 * b + 3)
            w.put(b, samples, {k: (v[rows], v[rows] + 1) for k, v in data.items()})
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert store.layers == ["a", "b", "c"] and store.aliases == {"b": "a"}
    assert not (tmp_path / "s.zarr" / "layers" / "b").exists()  # stored once
    assert np.array_equal(store.read_layer("b", "clean"), data["a"])
    assert np.array_equal(store.joint("b"), store.joint("a"))
    assert store.check() == []
    with pytest.raises(StoreError, match="aliases"):  # another aliasing is another store
        _create(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="alias 'b' -> 'z'"):
        _create(tmp_path / "t.zarr", aliases={"b": "z"})
    with pytest.raises(StoreError, match="differ in width"):
        _create(tmp_path / "u.zarr", aliases={"c": "a"})


def test_a_store_written_before_aliases_opens(tmp_path):
    _create(tmp_path / "old.zarr")
    meta = tmp_path / "old.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["aliases"]  # as older advlens wrote it
    meta.write_text(json.dumps(doc))
    store = _create(tmp_path / "old.zarr")  # resumed, not refused
    assert store.aliases == {} and store.stored_layers == ["a", "b", "c"]


def test_a_run_stores_and_computes_an_alias_once_and_reports_both_names(tmp_path):
    model = Aliased().eval()
    data = synthetic(n=60, shape=(1, 8, 8), seed=0)
    with torch.no_grad():  # labels = predictions: every sample can be attacked
        labels = model(torch.from_numpy(data.images)).argmax(1).numpy()
    res = advlens.analyze(
        model, data.images, labels, layers=["stem.1", "stem"], norm="linf", eps=0.1, n=30,
        engine="opentsne", out=tmp_path / "run", progress=False, attack__n_iter=3,
        attack__batch_size=15, embed__n_iter=250, n_jobs=1, pca_dims=10, bootstrap=0,
    )  # fmt: skip
    rows = {r["layer"]: r for r in res.table}
    assert set(rows) == {"input", "stem.1", "stem"}
    assert rows["stem"]["alias_of"] == "stem.1"
    for key in ("overlap", "calibrated", "auc", "task_id"):
        assert rows["stem"][key] == rows["stem.1"][key]
    assert rows["stem"]["layer_index"] == rows["stem.1"]["layer_index"] + 1
    assert len(list((tmp_path / "run" / "tasks").glob("*.json"))) == 2  # input, stem.1
    (zarr_path,) = (tmp_path / "run").glob("*.zarr")
    assert sorted(p.name for p in (zarr_path / "layers").iterdir() if p.is_dir()) == [
        "input",
        "stem.1",
    ]
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        table = {r["layer"]: r for r in csv.DictReader(fh)}
    assert table["stem"]["alias_of"] == "stem.1" and table["stem.1"]["alias_of"] == ""


def test_wrn_groups_are_aliases_of_their_last_block():
    from advlens.models.wrn import WideResNet

    cat = {i.name: i.alias_of for i in catalog(WideResNet(10, 1).eval(), (3, 32, 32))}
    assert cat["block1"] == "block1.layer.0" and cat["block3"] == "block3.layer.0"
    assert cat["relu"] is None and cat["block2.layer.0"] is None
