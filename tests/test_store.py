"""ActivationStore: round trips, geometry, attrs, readers, resume rules and damage detection."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advlens
from advlens.errors import StoreError
from advlens.store import (
    MIN_CHUNK_BYTES,
    SAMPLE_FIELDS,
    STORE_FORMAT,
    ActivationStore,
    chunk_rows,
)

CONFIG = {"data": {"n": 50, "seed": 0}, "attack": {"n_iter": 100, "eps": 0.1}, "embed": {"p": 30}}


def _attrs(**config_changes):
    cfg = {k: dict(v) for k, v in CONFIG.items()}
    for key, value in config_changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return {"config": cfg, "model": "tiny", "dataset": "synthetic"}


def _data(n, layers, dtype, seed=0):
    rng = np.random.default_rng(seed)
    acts = {
        name: tuple(rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
        for name, d in layers.items()
    }
    samples = {
        "index": rng.permutation(10 * n)[:n],
        "label": rng.integers(0, 10, n),
        "pred_clean": rng.integers(0, 10, n),
        "pred_perturbed": rng.integers(0, 10, n),
        "success": rng.random(n) < 0.5,
        "norm": rng.random(n).astype(np.float32),
    }
    return samples, acts


def _put(writer, store, batch, samples, acts):
    r0, r1 = store.batch_rows(batch)
    writer.put(
        batch,
        {k: v[r0:r1] for k, v in samples.items()},
        {k: (c[r0:r1], p[r0:r1]) for k, (c, p) in acts.items()},
    )


def _fill(store, samples, acts, batches=None, order_seed=0):
    batches = range(store.n_batches) if batches is None else batches
    order = np.random.default_rng(order_seed).permutation(list(batches))
    with store.writer(max_queue=2) as w:
        for b in order:
            _put(w, store, int(b), samples, acts)


def _make(tmp_path, n=50, layers=None, batch_size=16, dtype="float16", attrs=None, name="s"):
    layers = layers or {"input": 40, "conv1": 24}
    store = ActivationStore.create(
        tmp_path / f"{name}.zarr",
        n=n,
        layers=layers,
        batch_size=batch_size,
        dtype=dtype,
        attrs=attrs or _attrs(),
    )
    return store, *_data(n, layers, dtype)


# ----------------------------------------------------------------------------- geometry
@given(st.integers(1, 600), st.integers(1, 3 * MIN_CHUNK_BYTES))
def test_chunk_rows_is_the_smallest_divisor_reaching_1mb(batch_size, row_bytes):
    rows = chunk_rows(batch_size, row_bytes)
    assert batch_size % rows == 0
    big_enough = [
        d
        for d in range(1, batch_size + 1)
        if batch_size % d == 0 and d * row_bytes >= MIN_CHUNK_BYTES
    ]
    assert rows == (big_enough[0] if big_enough else batch_size)


def test_layout_geometry_and_attrs(tmp_path):
    layers = {"input": 784, "wide": 20_000}
    store = ActivationStore.create(
        tmp_path / "g.zarr", n=300, layers=layers, batch_size=128, dtype="float16", attrs=_attrs()
    )
    group = zarr.open_group(str(store.path), mode="r")
    wide = group["layers/wide/clean"]
    assert wide.shape == (300, 20_000) and wide.dtype == np.float16
    assert wide.shards == (128, 20_000)
    # 40,000 bytes a row: 32 rows (1.28 MB) is the smallest divisor of 128 reaching 1 MB.
    assert wide.chunks == (32, 20_000)
    assert wide.chunks[0] * 20_000 * 2 >= MIN_CHUNK_BYTES
    small = group["layers/input/perturbed"]
    assert small.chunks == (128, 784) and small.shards == (128, 784)  # < 1 MB even when whole
    assert wide.metadata.dimension_names == ("sample", "feature")
    meta = json.loads((store.path / "layers/wide/clean/zarr.json").read_text())
    (shard_codec,) = meta["codecs"]
    inner = {c["name"]: c.get("configuration", {}) for c in shard_codec["configuration"]["codecs"]}
    assert shard_codec["name"] == "sharding_indexed"
    assert inner["blosc"]["cname"] == "zstd" and "crc32c" in inner
    for field, dtype in SAMPLE_FIELDS.items():
        arr = group[f"samples/{field}"]
        assert arr.shape == (300,) and arr.dtype == np.dtype(dtype) and arr.chunks == (128,)
    assert group["progress/batches"].shape == (3,)
    attrs = store.attrs
    assert attrs["advlens_version"] == advlens.__version__ and attrs["store_format"] == STORE_FORMAT
    assert attrs["config"] == CONFIG and attrs["model"] == "tiny"
    assert attrs["dataset"] == "synthetic" and attrs["status"] == "writing"
    assert attrs["layers"] == ["input", "wide"]  # tap order, not alphabetical
    assert store.n_batches == 3 and store.layers == ["input", "wide"]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_all_readers(tmp_path, dtype):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16, dtype=dtype)
    _fill(store, samples, acts)
    assert store.is_complete() and store.completed_batches().tolist() == [True] * 4
    ro = ActivationStore.open(store.path)
    assert ro.attrs["status"] == "complete"
    for layer, (clean, pert) in acts.items():
        got = ro.read_layer(layer, "clean")
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, clean)
        assert np.array_equal(ro.read_layer(layer, "perturbed"), pert)
        joint = ro.joint(layer)
        assert joint.dtype == np.float32
        assert np.array_equal(joint, np.concatenate([clean, pert]).astype(np.float32))
        lazy = ro.dask_layer(layer, "perturbed")
        assert lazy.chunks == ((16, 16, 16, 2), (pert.shape[1],))
        assert np.array_equal(lazy.compute(scheduler="sync"), pert)
        # Dask workers get the graph pickled: the source reopens the store there.
        assert np.array_equal(pickle.loads(pickle.dumps(lazy)).compute(scheduler="sync"), pert)
        blocks = list(ro.iter_layer(layer, "clean"))
        assert [r0 for r0, _ in blocks] == [0, 16, 32, 48]
        assert np.array_equal(np.concatenate([b for _, b in blocks]), clean)
    got = ro.samples()
    for field, dtype_ in SAMPLE_FIELDS.items():
        assert got[field].dtype == np.dtype(dtype_)
        assert np.array_equal(got[field], np.asarray(samples[field], dtype=dtype_))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 17),
    width=st.integers(1, 9),
    dtype=st.sampled_from(["float16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, n, batch_size, width, dtype, seed):
    tmp = tmp_path_factory.mktemp("prop")
    store, samples, acts = _make(
        tmp, n=n, layers={"a": width, "b.0": width + 3}, batch_size=batch_size, dtype=dtype
    )
    assert store.n_batches == -(-n // batch_size)
    _fill(store, samples, acts, order_seed=seed)
    for layer, (clean, pert) in acts.items():
        assert np.array_equal(store.read_layer(layer, "clean"), clean)
        assert np.array_equal(store.joint(layer)[n:], pert.astype(np.float32))
    assert np.array_equal(store.samples()["index"], samples["index"])


def test_float32_input_is_cast_to_store_dtype(tmp_path):
    store, samples, acts = _make(tmp_path, n=20, batch_size=20, dtype="float16")
    acts32 = {k: (c.astype(np.float32), p.astype(np.float32)) for k, (c, p) in acts.items()}
    _fill(store, samples, acts32)
    assert np.array_equal(store.read_layer("conv1", "clean"), acts["conv1"][0])


def test_all_zero_batches_are_stored_not_skipped(tmp_path):
    # Zarr drops chunks equal to the fill value by default; the store must keep them so that a
    # missing file always means damage.
    store, samples, acts = _make(tmp_path, n=32, batch_size=16)
    zeros = {k: (np.zeros_like(c), np.zeros_like(p)) for k, (c, p) in acts.items()}
    samples = {k: np.zeros_like(v) for k, v in samples.items()}
    _fill(store, samples, zeros)
    assert (store.path / "layers/conv1/clean/c/1/0").is_file()
    assert (store.path / "samples/success/c/0").is_file()
    assert not store.read_layer("input", "perturbed").any()


# ----------------------------------------------------------------------------- progress
def test_progress_flags_only_completed_batches_and_readers_refuse_partial(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts, batches=[0, 2])
    assert store.completed_batches().tolist() == [True, False, True, False]
    assert not store.is_complete() and store.attrs["status"] == "writing"
    with pytest.raises(StoreError, match=r"incomplete \(2 of 4 batches"):
        store.read_layer("input", "clean")
    with pytest.raises(StoreError, match="incomplete"):
        store.joint("input")
    _fill(store, samples, acts, batches=[1, 3])
    assert store.is_complete()
    assert np.array_equal(store.read_layer("input", "clean"), acts["input"][0])


def test_resumed_writer_replaces_what_a_kill_left_of_unflagged_batches(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts, batches=[0, 1])
    # A kill during batch 2 (unflagged): torn shards, a stray temp file, a torn sample chunk,
    # and the last (edge) batch 3 also half there. Zarr reads a shard before rewriting it, so
    # these would break the resume if the writer did not clear them first.
    for key in ("layers/input/clean/c/2/0", "layers/conv1/perturbed/c/3/0", "samples/norm/c/3"):
        (store.path / key).parent.mkdir(parents=True, exist_ok=True)
        (store.path / key).write_bytes(b"torn" * 7)
    (store.path / "layers/input/clean/c/2/0.1234abcd.partial").write_bytes(b"half")
    kept = (store.path / "layers/input/clean/c/1/0").read_bytes()
    reopened = ActivationStore.create(
        store.path, n=50, layers={"input": 40, "conv1": 24}, batch_size=16, dtype="float16",
        attrs=_attrs(),
    )  # fmt: skip
    _fill(reopened, samples, acts, batches=[2, 3])
    assert (store.path / "layers/input/clean/c/1/0").read_bytes() == kept
    assert not list((store.path / "layers/input/clean/c/2").glob("*.partial"))
    for layer, (clean, pert) in acts.items():
        assert np.array_equal(reopened.read_layer(layer, "clean"), clean)
        assert np.array_equal(reopened.read_layer(layer, "perturbed"), pert)
    assert np.array_equal(reopened.samples()["norm"], samples["norm"])


def test_writer_error_reaches_the_producer_and_flags_nothing(tmp_path):
    store, samples, acts = _make(tmp_path, n=64, batch_size=16)
    # A regular file where batch 1's chunk directory must go: writing there fails (even as root).
    (store.path / "layers/conv1/perturbed/c").mkdir(parents=True)
    (store.path / "layers/conv1/perturbed/c/1").write_bytes(b"in the way")
    with pytest.raises(StoreError, match="writing to .* failed"):
        with store.writer(max_queue=1) as w:
            for b in range(store.n_batches):
                _put(w, store, b, samples, acts)
    # Batch 1 got its other arrays but never its flag; nothing after it was written.
    assert store.completed_batches().tolist() == [True, False, False, False]
    assert (store.path / "layers/conv1/clean/c/1/0").is_file()
    assert not any(t.name == "advlens-store-writer" for t in threading.enumerate())


def test_producer_exception_shuts_the_writer_down(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    with pytest.raises(KeyError, match="boom"):
        with store.writer() as w:
            _put(w, store, 0, samples, acts)
            raise KeyError("boom")
    assert not any(t.name == "advlens-store-writer" for t in threading.enumerate())
    done = store.completed_batches()
    assert not done[1:].any()
    _fill(store, samples, acts, batches=np.flatnonzero(~done))  # resume finishes the rest
    assert np.array_equal(store.read_layer("conv1", "perturbed"), acts["conv1"][1])


def test_put_validates_batches(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    with store.writer() as w:
        with pytest.raises(StoreError, match=r"layers/conv1/clean .* holds 24 values"):
            w.put(0, {k: v[:16] for k, v in samples.items()},
                  {"input": (acts["input"][0][:16],) * 2, "conv1": (np.zeros((16, 25)),) * 2})  # fmt: skip
        with pytest.raises(StoreError, match="pass exactly the store's layers"):
            w.put(
                0, {k: v[:16] for k, v in samples.items()}, {"input": (acts["input"][0][:16],) * 2}
            )
        with pytest.raises(ValueError, match="expected \\(2,\\)"):
            _put(w, store, 3, {k: v[:16] for k, v in samples.items()}, acts)
        with pytest.raises(IndexError):
            _put(w, store, 4, samples, acts)
        _put(w, store, 1, samples, acts)
        with pytest.raises(ValueError, match="already put"):
            _put(w, store, 1, samples, acts)
    assert store.completed_batches().tolist() == [False, True, False, False]
    with store.writer() as w:  # a stored batch is never written twice
        with pytest.raises(ValueError, match="already stored"):
            _put(w, store, 1, samples, acts)


# ----------------------------------------------------------------------------- resume rules
def test_same_config_reopens_and_keeps_data(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts, batches=[0, 1])
    # Attrs outside the identity keys (the full run config) do not block a resume.
    again = ActivationStore.create(
        store.path, n=50, layers={"input": 40, "conv1": 24}, batch_size=16, dtype="float16",
        attrs=_attrs() | {"run_config": {"embed": {"p": 50}}},
    )  # fmt: skip
    assert again.completed_batches().tolist() == [True, True, False, False]


def test_different_config_is_refused_with_the_differences(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts, batches=[0])
    with pytest.raises(StoreError) as err:
        ActivationStore.create(
            store.path, n=60, layers={"input": 40, "conv1": 24}, batch_size=16, dtype="float16",
            attrs=_attrs(attack__n_iter=50, data__seed=3),
        )  # fmt: skip
    msg = str(err.value)
    assert "attack.n_iter: 100 in the store, 50 now" in msg
    assert "data.seed: 0 in the store, 3 now" in msg
    assert "n (samples): 50 in the store, 60 now" in msg
    assert "--overwrite" in msg and "embed" not in msg
    # Nothing was touched.
    assert store.completed_batches().tolist() == [True, False, False, False]
    with pytest.raises(StoreError, match=r"layers: \['input', 'conv1'\] in the store, \['input'\]"):
        ActivationStore.create(
            store.path, n=50, layers={"input": 40}, batch_size=16, dtype="float16", attrs=_attrs()
        )


def test_overwrite_recreates(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    fresh = ActivationStore.create(
        store.path, n=20, layers={"x": 3}, batch_size=8, dtype="float32",
        attrs=_attrs(attack__n_iter=5), overwrite=True,
    )  # fmt: skip
    assert fresh.n == 20 and fresh.layers == ["x"] and not fresh.completed_batches().any()
    assert not (store.path / "layers/conv1").exists()


def test_foreign_directory_is_never_deleted(tmp_path):
    target = tmp_path / "mine.zarr"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError):
            ActivationStore.create(
                target, n=4, layers={"x": 2}, batch_size=2, dtype="float16", attrs={},
                overwrite=overwrite,
            )  # fmt: skip
    assert (target / "notes.txt").read_text() == "precious"


def test_width_mismatch_names_the_array(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    with pytest.raises(StoreError, match=r"layers/conv1/clean .* holds 24 .* gives 30"):
        ActivationStore.create(
            store.path, n=50, layers={"input": 40, "conv1": 30}, batch_size=16,
            dtype="float16", attrs=_attrs(),
        )  # fmt: skip


def test_incompatible_format_version_is_refused(tmp_path):
    store, samples, acts = _make(tmp_path, n=20, batch_size=10)
    _fill(store, samples, acts)
    zarr.open_group(str(store.path), mode="r+").update_attributes({"store_format": 0})
    with pytest.raises(StoreError, match=f"store format 0 .* reads format {STORE_FORMAT}"):
        ActivationStore.open(store.path)
    with pytest.raises(StoreError, match="store format 0"):
        ActivationStore.create(
            store.path, n=20, layers={"input": 40, "conv1": 24}, batch_size=10,
            dtype="float16", attrs=_attrs(),
        )  # fmt: skip
    assert (store.path / "layers/conv1/clean/c/0/0").is_file()  # not silently overwritten


def test_missing_store_and_unknown_layer(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open(tmp_path / "nope.zarr")
    store, samples, acts = _make(tmp_path, n=20, batch_size=10)
    _fill(store, samples, acts)
    with pytest.raises(StoreError, match="closest valid names.*conv1"):
        store.read_layer("conv2", "clean")
    with pytest.raises(StoreError, match="clean' or 'perturbed"):
        store.read_layer("conv1", "adv")


# ----------------------------------------------------------------------------- damage
def test_missing_chunk_names_the_array(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    (store.path / "layers/conv1/perturbed/c/2/0").unlink()
    ro = ActivationStore.open(store.path)
    assert np.array_equal(ro.read_layer("conv1", "clean"), acts["conv1"][0])
    for read in (
        lambda: ro.read_layer("conv1", "perturbed"),
        lambda: ro.joint("conv1"),
        lambda: ro.dask_layer("conv1", "perturbed"),
    ):
        with pytest.raises(
            StoreError, match=r"layers/conv1/perturbed .* rows 32:48 .*c/2/0 is missing"
        ):
            read()
    (store.path / "samples/label/c/1").unlink()
    with pytest.raises(StoreError, match="samples/label"):
        ro.samples()


@pytest.mark.parametrize("where", ["middle", "index"])
def test_garbled_chunk_names_the_array(tmp_path, where):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    shard = store.path / "layers/input/clean/c/1/0"
    raw = bytearray(shard.read_bytes())
    pos = len(raw) // 2 if where == "middle" else len(raw) - 8  # chunk data / shard index
    raw[pos] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ro = ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=r"array layers/input/clean .* rows 16:32 .*damaged"):
        ro.read_layer("input", "clean")
    with pytest.raises(StoreError, match="array layers/input/clean"):
        ro.dask_layer("input", "clean").compute(scheduler="sync")
    assert np.array_equal(ro.read_layer("input", "perturbed"), acts["input"][1])


def test_damaged_array_metadata_names_the_array(tmp_path):
    store, samples, acts = _make(tmp_path, n=20, batch_size=10)
    _fill(store, samples, acts)
    (store.path / "layers/conv1/perturbed/zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="array layers/conv1/perturbed .* unreadable metadata"):
        ActivationStore.open(store.path)


def test_truncated_chunk_names_the_array(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    shard = store.path / "layers/conv1/clean/c/0/0"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(StoreError, match=r"array layers/conv1/clean .* rows 0:16"):
        store.joint("conv1")


@pytest.mark.parametrize("cut", ["empty", "one byte", "half", "deleted"])
@pytest.mark.parametrize("array", ["layers/conv1/clean", "samples/label"])
def test_cut_short_or_deleted_file_is_refused_then_rewritten(tmp_path, cut, array):
    # A 0-byte shard decodes as fill-value zeros: only the manifest's sizes catch it.
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    path = store.batch_files(1)[array]
    raw = path.read_bytes()
    if cut == "deleted":
        path.unlink()
    else:
        path.write_bytes(raw[: {"empty": 0, "one byte": 1, "half": len(raw) // 2}[cut]])
    ro = ActivationStore.open(store.path)
    read = ro.samples if array.startswith("samples") else lambda: ro.joint("conv1")
    with pytest.raises(StoreError, match=rf"array {array} .* rows 16:32 .*advlens run"):
        read()
    (problem,) = ro.check(checksums=False)
    assert problem.startswith("batch 1: ") and path.name in problem
    # A resumed writer redoes the batch; the store then reads back what was written.
    again = ActivationStore.create(
        store.path, n=50, layers={"input": 40, "conv1": 24}, batch_size=16,
        dtype="float16", attrs=_attrs(),
    )  # fmt: skip
    assert again.completed_batches().tolist() == [True, False, True, True]
    _fill(again, samples, acts, batches=[1])
    assert path.read_bytes() == raw and again.check() == []
    assert np.array_equal(again.samples()["label"], samples["label"])
    assert np.array_equal(again.joint("conv1")[:50], acts["conv1"][0].astype(np.float32))


def test_checksums_catch_a_flipped_byte_and_a_lost_manifest(tmp_path):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    assert store.check() == []
    shard = store.batch_files(2)["layers/input/perturbed"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert store.check(checksums=False) == []  # same size: only the checksum sees it
    assert store.check() == ["batch 2: layers/input/perturbed/c/2/0 does not match its checksum"]
    (store.path / "progress/batches/manifest/0.json").write_text("")
    assert store.check()[0].startswith("batch 0: its manifest")
    with pytest.raises(StoreError, match="rows 0:16 .*manifest"):
        ActivationStore.open(store.path).read_layer("conv1", "clean")
    assert sorted(store.repair()) == [0, 2]
    assert store.completed_batches().tolist() == [False, True, False, True]


def test_damaged_progress_flag_counts_as_not_written(tmp_path, caplog):
    store, samples, acts = _make(tmp_path, n=50, batch_size=16)
    _fill(store, samples, acts)
    (store.path / "progress/batches/c/1").write_bytes(b"\x00")
    ro = ActivationStore.open(store.path)
    assert ro.completed_batches().tolist() == [True, False, True, True]
    assert "progress flag of batch 1 is damaged" in caplog.text
    with pytest.raises(StoreError, match="incomplete .*advlens run"):
        ro.joint("input")
    _fill(ActivationStore.open(store.path, mode="r+"), samples, acts, batches=[1])
    again = ActivationStore.open(store.path)
    assert again.is_complete() and again.check() == []
    assert np.array_equal(again.joint("input")[50:], acts["input"][1].astype(np.float32))
