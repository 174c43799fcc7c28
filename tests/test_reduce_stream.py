"""Streamed PCA from the activation store against scikit-learn's exact PCA of the joint matrix.

Stores are small, seeded and written with the real :class:`ActivationStore`. The oracle is
``PCA(svd_solver="full")`` on the (2N x D) matrix in float64: the streamed components span the
same subspace (principal angles, scipy) with the same explained variance, in the exact branch
and in the randomized one (forced on a narrow layer with a small ``exact_max_d``).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

import advlens.reduce as reduce_mod
from advlens.errors import StoreError
from advlens.reduce import pca_blocks, reduce, reduce_store
from advlens.store import ActivationStore

SAMPLES = {"index": "int64", "label": "int64", "pred_clean": "int64", "pred_perturbed": "int64",
           "success": "bool", "norm": "float32"}  # fmt: skip


def structured(n, d, rank=12, seed=0):
    """Clean and perturbed rows: a decaying low-rank signal plus noise, the perturbed ones
    shifted; every gap among the leading components is wide."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d))
    scale = np.geomspace(20, 2, rank)
    clean = (rng.normal(size=(n, rank)) * scale) @ basis + 3 + rng.normal(scale=0.1, size=(n, d))
    pert = clean + rng.normal(scale=0.5, size=(1, d)) + rng.normal(scale=0.1, size=(n, d))
    return clean.astype(np.float32), pert.astype(np.float32)


def make_store(path, n=300, d=64, batch_size=64, dtype="float32", seed=0):
    clean, pert = structured(n, d, seed=seed)
    store = ActivationStore.create(path, n=n, layers={"layer": d}, batch_size=batch_size,
                                   dtype=dtype, attrs={"config": {"test": True}})  # fmt: skip
    with store.writer() as w:
        for b in range(store.n_batches):
            r0, r1 = store.batch_rows(b)
            samples = {k: np.zeros(r1 - r0, dtype=t) for k, t in SAMPLES.items()}
            samples["label"] = np.arange(r0, r1) % 3
            w.put(b, samples, {"layer": (clean[r0:r1], pert[r0:r1])})
    return ActivationStore.open(path)


def oracle(store, q):
    return PCA(n_components=q, svd_solver="full").fit(store.joint("layer").astype(np.float64))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("stream") / "s.zarr", n=300, d=64, batch_size=64)


@pytest.mark.parametrize("exact_max_d", [4096, 16], ids=["exact", "randomized"])
@pytest.mark.parametrize("budget", [1 << 20, 64 << 20], ids=["small", "large"])
def test_streamed_pca_matches_sklearn(store, exact_max_d, budget):
    q = 6
    got = reduce_store(store, "layer", q, budget=budget, exact_max_d=exact_max_d, device="cpu")
    ref = oracle(store, q)
    assert got.method == ("exact" if exact_max_d == 4096 else "randomized")
    assert got.passes == (2 if got.method == "exact" else reduce_mod.POWER_ITERATIONS + 1)
    angles = subspace_angles(got.components.astype(np.float64), ref.components_.T)
    assert angles.max() < 1e-3, angles
    np.testing.assert_allclose(got.explained_variance, ref.explained_variance_, rtol=1e-4)
    # Scores: the centred rows on the same components (sign fixed per component).
    want = ref.transform(store.joint("layer").astype(np.float64))
    signs = np.sign(np.sum(want * got.scores, axis=0))
    np.testing.assert_allclose(got.scores, want * signs, atol=2e-3 * np.abs(want).max())
    assert np.all(np.abs(got.scores).max(0) == got.scores.max(0))  # largest entry positive


@pytest.mark.parametrize("exact_max_d", [4096, 16], ids=["exact", "randomized"])
def test_result_is_bit_identical_for_any_budget(tmp_path, monkeypatch, exact_max_d):
    # Inner chunks of 40 rows: neither a divisor nor a multiple of any block size below.
    monkeypatch.setattr(reduce_mod, "CHUNK_VALUES", 40 * 64)
    store = make_store(tmp_path / "s.zarr", n=300, d=64, batch_size=50, dtype="float16")
    assert [store.block_rows("layer", b) for b in (1 << 20, 8 << 20)] == [4050, 32750]
    outs = []
    for rows in (7, 50, 300):
        blocks = lambda r=rows: store.joint_rows("layer", r)  # noqa: E731
        outs.append(pca_blocks(blocks, 600, 64, 5, exact_max_d=exact_max_d, device="cpu"))
    outs.append(reduce_store(store, "layer", 5, budget=1 << 20, exact_max_d=exact_max_d,
                             device="cpu"))  # fmt: skip
    for other in outs[1:]:
        assert np.array_equal(other.scores, outs[0].scores)
        assert np.array_equal(other.components, outs[0].components)
        assert np.array_equal(other.explained_variance, outs[0].explained_variance)


def test_blocks_stay_within_the_budget(tmp_path):
    # 2N x D float32 is 16 MB; a 2 MiB budget reads it in blocks of two shards (0.8 MB).
    store = make_store(tmp_path / "s.zarr", n=1000, d=2000, batch_size=50, dtype="float16")
    joint_bytes = 2 * 1000 * 2000 * 4
    assert store.block_rows("layer", (2 << 20) // 2) == 100
    tracemalloc.start()
    try:
        got = reduce_store(store, "layer", 5, budget=2 << 20, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < joint_bytes / 4, peak  # blocks, zarr's buffers and the scores
    ref = reduce(store.joint("layer"), 5, device="cpu")
    signs = np.sign(np.sum(ref * got.scores, axis=0))
    np.testing.assert_allclose(got.scores, ref * signs, atol=1e-3 * np.abs(ref).max())


def test_joint_rows_cover_the_joint_matrix_in_order(store):
    joint = store.joint("layer")
    for rows in (1, 30, 64, 1000):
        blocks = list(store.joint_rows("layer", rows))
        starts = [r0 for r0, _ in blocks]
        assert starts == sorted(starts) and all(b.dtype == np.float32 for _, b in blocks)
        assert all(r0 + len(b) <= 300 or r0 >= 300 for r0, b in blocks)  # one half each
        assert max(len(b) for _, b in blocks) == min(rows, 300)
        assert np.array_equal(np.concatenate([b for _, b in blocks]), joint)
    with pytest.raises(ValueError, match="rows = 0"):
        next(store.joint_rows("layer", 0))


def test_block_rows_align_to_shards_then_chunks(store):
    row = 64 * 4  # float32 bytes per row
    assert store.block_rows("layer", 10 * 64 * row) == 640  # whole shards
    assert store.block_rows("layer", 100 * row) == 64
    # below one shard: whole chunks (of 64 rows here: a shard is one chunk), at least one
    assert store.block_rows("layer", 10 * row) == 64


def test_a_damaged_block_names_the_array(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=150, d=64, batch_size=50)
    (store.path / "layers/layer/perturbed/c/1/0").unlink()
    ro = ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=r"layers/layer/perturbed .* rows 50:100"):
        reduce_store(ro, "layer", 5, budget=1 << 20, device="cpu")


def test_narrow_layer_is_centred_not_projected(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=100, d=8, batch_size=50)
    got = reduce_store(store, "layer", 10, budget=1 << 20, device="cpu")
    joint = store.joint("layer")
    assert got.method == "centred"
    np.testing.assert_allclose(got.scores, joint - joint.mean(0), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("exact_max_d", [4096, 16], ids=["exact", "randomized"])
def test_gpu_streamed_pca_matches_cpu(store, exact_max_d):
    cpu = reduce_store(store, "layer", 6, budget=1 << 20, exact_max_d=exact_max_d, device="cpu")
    gpu = reduce_store(store, "layer", 6, budget=1 << 20, exact_max_d=exact_max_d,
                       device="cuda")  # fmt: skip
    angles = subspace_angles(gpu.components.astype(np.float64), cpu.components.astype(np.float64))
    assert angles.max() < 1e-4
    np.testing.assert_allclose(gpu.explained_variance, cpu.explained_variance, rtol=1e-5)
