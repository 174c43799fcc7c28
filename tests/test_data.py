"""Datasets: IDX, CIFAR-10 (binary and python releases), image folders, synthetic, sampling.

The tests write small files in the real formats and compare what advlens reads with the
values written.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advlens.data import (
    FASHION_MNIST_DIR,
    Dataset,
    load_dataset,
    stratified_sample,
    synthetic,
)
from advlens.errors import DataError

# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file as published: zero, zero, type code 0x08 (ubyte), ndim, big-endian dims."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_fmnist(folder, n=30, prefix="t10k", seed=0, gz=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, arr in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    images, labels = write_fmnist(tmp_path, n=30, gz=gz)
    ds = load_dataset("fashion-mnist", "test", str(tmp_path))
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.images[:, 0], images.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.index, np.arange(30))
    assert ds.classes[9] == "Ankle boot" and ds.name == "fashion-mnist"


def test_fashion_mnist_train_split(tmp_path):
    images, _ = write_fmnist(tmp_path, n=12, prefix="train", seed=3)
    ds = load_dataset("fashion-mnist", "train", str(tmp_path))
    np.testing.assert_array_equal(ds.images[:, 0], images / np.float32(255))


def test_missing_file_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as exc:
        load_dataset("fashion-mnist", "test", str(tmp_path))
    assert "data.path" in str(exc.value)


def test_bad_magic_truncated_and_mismatched_counts(tmp_path):
    write_fmnist(tmp_path, n=10)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    lab = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(b"\x01\x02" + good[2:]))
    with pytest.raises(DataError, match="magic"):
        load_dataset("fashion-mnist", "test", str(tmp_path))
    img.write_bytes(gzip.compress(good[:-5]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "test", str(tmp_path))
    img.write_bytes(gzip.compress(good))
    lab.write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_dataset("fashion-mnist", "test", str(tmp_path))
    lab.write_bytes(gzip.compress(idx_bytes(np.full(10, 12, np.uint8))))
    with pytest.raises(DataError, match="label 12"):
        load_dataset("fashion-mnist", "test", str(tmp_path))
    img.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match="gzip"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


def test_wrong_image_size(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((4, 32, 32), np.uint8)))
    )
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(4, np.uint8)))
    )
    with pytest.raises(DataError, match="28x28"):
        load_dataset("fashion-mnist", "test", str(tmp_path))


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed",
)
def test_real_fashion_mnist_test_split():
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 and ds.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))


# --------------------------------------------------------------------------- CIFAR-10


def cifar_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_cifar_bin(folder, batches):
    for name, (x, y) in batches.items():
        rec = np.concatenate([y[:, None], x], axis=1)  # <1 x label><3072 x pixel>
        rec.tofile(folder / f"{name}.bin")


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the CIFAR-10 python release does."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its pickle helpers numpy._core; the release (numpy 1, Python 2) says numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar_py(folder, batches, label_names=None):
    for name, (x, y) in batches.items():
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in y],
            b"data": x,
            b"filenames": [f"img{i}.png".encode() for i in range(len(y))],
        }
        (folder / name).write_bytes(py2_pickle(d))
    if label_names:
        meta = {
            b"num_cases_per_batch": 10000,
            b"label_names": [s.encode() for s in label_names],
            b"num_vis": 3072,
        }
        (folder / "batches.meta").write_bytes(py2_pickle(meta))


def test_py2_pickle_is_python2_style():
    raw = py2_pickle({b"data": np.zeros((2, 3), np.uint8)})
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw


@pytest.fixture
def cifar_batches():
    return {
        "data_batch_1": cifar_arrays(7, 1),
        "data_batch_2": cifar_arrays(5, 2),
        "data_batch_10": cifar_arrays(3, 10),  # numeric, not lexical, order
        "test_batch": cifar_arrays(6, 3),
    }


def expected(batches, names):
    x = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32) / np.float32(255)
    return x, np.concatenate([batches[n][1] for n in names]).astype(np.int64)


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar10_both_releases(tmp_path, cifar_batches, fmt):
    sub = tmp_path / ("cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    sub.mkdir()
    if fmt == "bin":
        write_cifar_bin(sub, cifar_batches)
    else:
        write_cifar_py(sub, cifar_batches, label_names=[f"c{i}" for i in range(10)])
    test = load_dataset("cifar10", "test", str(tmp_path))
    x, y = expected(cifar_batches, ["test_batch"])
    np.testing.assert_array_equal(test.images, x)
    np.testing.assert_array_equal(test.labels, y)
    train = load_dataset("cifar10", "train", str(sub))
    x, y = expected(cifar_batches, ["data_batch_1", "data_batch_2", "data_batch_10"])
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, y)
    np.testing.assert_array_equal(train.index, np.arange(15))
    assert train.images.dtype == np.float32 and train.shape == (3, 32, 32)
    if fmt == "py":
        assert train.classes == tuple(f"c{i}" for i in range(10))
    else:
        assert train.classes[0] == "airplane"


def test_cifar10_channel_layout(tmp_path):
    """The record's 3072 bytes are 1024 red, then 1024 green, then 1024 blue (row-major)."""
    x = np.zeros((1, 3072), np.uint8)
    x[0, 0] = 10  # red (0, 0)
    x[0, 1024 + 33] = 20  # green (1, 1)
    x[0, 2048 + 1023] = 30  # blue (31, 31)
    write_cifar_bin(tmp_path, {"test_batch": (x, np.array([4], np.uint8))})
    img = load_dataset("cifar10", "test", str(tmp_path)).images[0] * 255
    assert img[0, 0, 0] == pytest.approx(10) and img[1, 1, 1] == pytest.approx(20)
    assert img[2, 31, 31] == pytest.approx(30) and img.sum() == pytest.approx(60)


def test_cifar10_validation(tmp_path, cifar_batches):
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("cifar10", "test")
    with pytest.raises(DataError, match="no CIFAR-10 batches"):
        load_dataset("cifar10", "test", str(tmp_path))
    write_cifar_bin(tmp_path, {"test_batch": cifar_batches["test_batch"]})
    with pytest.raises(DataError, match="train batches"):
        load_dataset("cifar10", "train", str(tmp_path))
    f = tmp_path / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match="whole number of CIFAR-10 records"):
        load_dataset("cifar10", "test", str(tmp_path))
    x, y = cifar_batches["test_batch"]
    write_cifar_bin(tmp_path, {"test_batch": (x, np.full_like(y, 10))})
    with pytest.raises(DataError, match="label 10"):
        load_dataset("cifar10", "test", str(tmp_path))


def test_cifar10_python_validation(tmp_path):
    (tmp_path / "test_batch").write_bytes(
        py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match=r"uint8 \(N, 3072\)"):
        load_dataset("cifar10", "test", str(tmp_path))
    (tmp_path / "test_batch").write_bytes(
        py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(DataError, match="2 images but labels"):
        load_dataset("cifar10", "test", str(tmp_path))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_cifar10_python_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(py2_pickle(payload))
    with pytest.raises(DataError, match="refusing to load .*mkdir"):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not marker.exists()


# --------------------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for cls in ("cat", "dog"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "test" / cls / f"{i}.png")
            written[(cls, i)] = arr
    (tmp_path / "test" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", "test", str(tmp_path))
    assert ds.classes == ("cat", "dog") and ds.images.shape == (6, 3, 8, 6)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(
        ds.images[4], written[("dog", 1)].transpose(2, 0, 1) / 255, rtol=0, atol=1e-7
    )
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "test" / "dog" / "odd.png")
    with pytest.raises(DataError, match="same size"):
        load_dataset("folder", "test", str(tmp_path))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("folder", "test")


def test_image_folder_grayscale(tmp_path):
    from PIL import Image

    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(arr).save(tmp_path / cls / "x.png")
    ds = load_dataset("folder", "test", str(tmp_path))
    assert ds.images.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(ds.images[1, 0], arr / 255, atol=1e-7)


# --------------------------------------------------------------------------- synthetic, sampling


def test_synthetic_is_seeded_and_learnable():
    train, test = synthetic(300, seed=1), synthetic(200, seed=0)
    assert train.images.shape == (300, 1, 28, 28) and train.images.dtype == np.float32
    assert 0 <= train.images.min() and train.images.max() <= 1
    again = synthetic(200, seed=0)
    np.testing.assert_array_equal(test.images, again.images)
    assert not np.array_equal(test.images, synthetic(200, seed=2).images)
    # a nearest-centroid classifier fitted on one seed separates the classes of another
    xtr, xte = train.images.reshape(300, -1), test.images.reshape(200, -1)
    centroids = np.stack([xtr[train.labels == c].mean(0) for c in range(10)])
    pred = ((xte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == test.labels).mean() > 0.9
    rgb = synthetic(20, shape=(3, 8, 8), n_classes=4, seed=0)
    assert rgb.images.shape == (20, 3, 8, 8) and set(rgb.labels) == {0, 1, 2, 3}


def test_dataset_subset_and_validation():
    ds = synthetic(50, seed=0)
    sub = ds.subset([3, 1, 40])
    np.testing.assert_array_equal(sub.index, [3, 1, 40])
    np.testing.assert_array_equal(sub.images[2], ds.images[40])
    with pytest.raises(ValueError, match="labels"):
        Dataset(ds.images, ds.labels[:-1], ds.index, "x", ds.classes)
    with pytest.raises(DataError, match="closest valid names.*: fashion-mnist"):
        load_dataset("fashion-mnits")
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic", "validation")


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_sample_properties(counts, frac, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    n = int(round(frac * len(labels)))
    pos = stratified_sample(labels, n, seed)
    assert len(pos) == n and pos.dtype == np.int64
    assert np.all(np.diff(pos) > 0)  # sorted, unique
    got = np.bincount(labels[pos], minlength=len(counts))
    full = got == np.asarray(counts)
    # balanced: a class gets fewer than another by 2 or more only when it is exhausted
    for a in range(len(counts)):
        for b in range(len(counts)):
            if got[a] + 1 < got[b]:
                assert full[a]
    np.testing.assert_array_equal(pos, stratified_sample(labels, n, seed))


def test_stratified_sample_seeds_and_limits():
    labels = np.repeat(np.arange(10), 100)
    a, b = stratified_sample(labels, 50, 0), stratified_sample(labels, 50, 1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(np.bincount(labels[a]), np.full(10, 5))
    with pytest.raises(DataError, match="cannot sample 1001 of 1000"):
        stratified_sample(labels, 1001, 0)
