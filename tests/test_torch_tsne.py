"""The torch t-SNE engine (advlens.kernels.tsne, tsne_fft; advlens.embed.torch_tsne).

Oracles: a dense float64 NumPy gradient and KL written here, scikit-learn's exact kNN and
``_joint_probabilities_nn``, openTSNE's ``joint_probabilities_nn`` and openTSNE itself for
map quality.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advlens.kernels import tsne as T
from advlens.kernels.tsne_fft import n_boxes_for, repulsion_fft


@pytest.fixture(autouse=True)
def _one_thread():
    # Several test sessions share 2 cores: 2 OpenMP threads then spin-wait on each other and
    # run tens of times slower than one.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _blobs(n: int, d: int, seed: int, spread: float = 6.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (6, d))
    return (centres[rng.integers(0, 6, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def _layout(n: int, seed: int, extent: float = 60.0) -> np.ndarray:
    """A map shaped like a converged t-SNE: tight clusters spread over ``extent`` units."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-extent / 2, extent / 2, (8, 2))
    return (centres[rng.integers(0, 8, n)] + rng.normal(0, 2.5, (n, 2))).astype(np.float32)


def _dense(y: np.ndarray, P: np.ndarray):
    """Attraction, repulsion, Z and KL(P||Q) in float64 from the full pairwise matrices."""
    y = y.astype(np.float64)
    d = y[:, None, :] - y[None, :, :]
    w = 1.0 / (1.0 + (d**2).sum(-1))
    np.fill_diagonal(w, 0.0)
    z = w.sum()
    attr = ((P * w)[..., None] * d).sum(1)
    rep = ((w**2)[..., None] * d).sum(1)
    nz = P > 0
    kl = float((P[nz] * np.log(P[nz] / (w[nz] / z))).sum())
    return attr, rep, z, kl


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _sklearn_knn(x: np.ndarray, k: int):
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k).fit(x.astype(np.float64)).kneighbors()
    return idx, dist


@pytest.fixture(scope="module")
def graph300():
    x = _blobs(300, 10, seed=1)
    idx, dist = _sklearn_knn(x, 90)
    P = T.calibrate(torch.tensor(idx), torch.tensor(dist, dtype=torch.float32), 30.0)
    return x, idx, dist, P


# ----------------------------------------------------------------------------- affinities


def test_exact_knn_matches_sklearn_across_chunks():
    x = _blobs(257, 12, seed=0)
    idx_ref, dist_ref = _sklearn_knn(x, 15)
    # a tiny block budget forces many row chunks, so self-exclusion is tested off-diagonal too
    idx, dist = T.exact_knn(torch.tensor(x), 15, block_elems=257 * 7)
    np.testing.assert_array_equal(idx.numpy(), idx_ref)
    np.testing.assert_allclose(dist.numpy(), dist_ref, rtol=1e-5)


def test_affinities_match_opentsne_and_sklearn(graph300):
    import scipy.sparse as sp
    from openTSNE.affinity import joint_probabilities_nn
    from sklearn.manifold._t_sne import _joint_probabilities_nn

    x, idx, dist, P = graph300
    mine = P.dense().numpy().astype(np.float64)
    assert mine.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(mine, mine.T, atol=1e-9)
    ot = joint_probabilities_nn(idx, dist, [30.0]).toarray()
    n = x.shape[0]
    sq = sp.csr_matrix((dist.ravel() ** 2, idx.ravel(), np.arange(0, n * 90 + 1, 90)), (n, n))
    sk = _joint_probabilities_nn(sq, 30.0, 0).toarray()
    for ref in (ot, sk):
        assert np.abs(mine - ref).max() <= 1e-4 * ref.max()
        big = ref > 1e-3 * ref.max()
        assert (np.abs(mine - ref)[big] / ref[big]).max() < 1e-3
        # entries float32 rounds to 0 are ones the references hold at < 1e-30 of the largest
        assert ref[mine == 0].max(initial=0.0) < 1e-30 * ref.max()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(6, 60),
    scale=st.floats(1e-3, 1e3),
    frac=st.floats(0.1, 0.6),
)
def test_conditional_p_hits_target_perplexity(seed, k, scale, frac):
    rng = np.random.default_rng(seed)
    dist = np.sort(rng.gamma(2.0, scale, (40, k)), axis=1).astype(np.float32)
    perplexity = max(1.5, frac * k)
    p = T.conditional_p(torch.tensor(dist), perplexity).double().numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    np.testing.assert_allclose(entropy, np.log(perplexity), atol=1e-3)


def test_perplexity_above_k_is_lowered_like_opentsne():
    x = torch.tensor(_blobs(40, 5, seed=3))
    P = T.affinities(x, 30.0)  # k = min(n - 1, 90) = 39; perplexity 30 <= k is kept
    assert P.k == 39 and P.perplexity == 30.0
    idx, dist = T.exact_knn(x, 12)
    assert T.calibrate(idx, dist, 30.0).perplexity == pytest.approx(4.0)


# ----------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("exaggeration", [1.0, 12.0])
def test_exact_gradient_matches_dense(graph300, exaggeration):
    _, _, _, P = graph300
    y = _layout(300, seed=2, extent=40)
    attr, rep, z, _ = _dense(y, P.dense().double().numpy())
    # row blocks of 7 exercise the tiling
    rep_t, z_t = T.repulsion_exact(torch.tensor(y), block_elems=300 * 7)
    assert _rel(rep_t, rep) < 1e-3
    assert abs(float(z_t) - z) / z < 1e-3
    grad, z_g = T.gradient(torch.tensor(y), P, exaggeration=exaggeration, method="exact")
    assert _rel(grad, exaggeration * attr - rep / z) < 1e-3


def test_fft_gradient_matches_dense(graph300):
    _, _, _, P = graph300
    y = _layout(300, seed=4, extent=60)
    attr, rep, z, _ = _dense(y, P.dense().double().numpy())
    rep_f, z_f = repulsion_fft(torch.tensor(y))
    assert _rel(rep_f, rep) < 1e-2
    assert abs(float(z_f) - z) / z < 1e-2
    grad, _ = T.gradient(torch.tensor(y), P, method="fft")
    assert _rel(grad, attr - rep / z) < 1e-2


def test_fft_error_falls_as_cube_of_box_width():
    y = _layout(400, seed=5, extent=80)
    _, rep, z, _ = _dense(y, np.zeros((400, 400)))
    errs = [_rel(repulsion_fft(torch.tensor(y), nb)[0], rep) for nb in (60, 120, 240)]
    # third-order interpolation: halving the box width divides the error by about 8
    assert errs[0] / errs[1] > 4 and errs[1] / errs[2] > 4, errs


def test_fft_handles_a_collapsed_map():
    y = torch.zeros((50, 2))
    rep, z = repulsion_fft(y)
    assert float(z) == pytest.approx(50 * 49, rel=1e-3)
    assert float(rep.abs().max()) < 1e-3


def test_grid_size_is_fft_friendly_and_bounded():
    assert n_boxes_for(0.0) == 50
    for extent in (30.0, 77.7, 123.4, 499.0):
        nb = n_boxes_for(extent)
        assert nb >= 2 * extent and nb >= 50
        r = nb
        for f in (2, 3, 5, 7):
            while r % f == 0:
                r //= f
        assert r == 1
    assert n_boxes_for(1e9) == 1000 and n_boxes_for(float("inf")) == 1000


def test_grid_sizes_form_a_fixed_ladder_of_bands():
    sizes = sorted({n_boxes_for(e / 10) for e in range(0, 6000)})
    assert len(sizes) <= 16 and sizes[0] == 50 and sizes[-1] == 1000
    assert all(b >= 1.25 * a for a, b in zip(sizes[:-2], sizes[1:-1], strict=True))


# ----------------------------------------------------------------------------- optimiser


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def test_kl_decreases_and_matches_dense(digits):
    x = torch.tensor(digits[:300])
    res = T.tsne(x, n_iter=150, early_exaggeration_iter=50, method="exact", kl_every=10)
    kl = dict(res.kl)
    after_ee = [kl[i] for i in sorted(kl) if i >= 60]
    assert kl[150] < kl[60] < kl[0]
    assert all(b <= a + 1e-3 for a, b in zip(after_ee, after_ee[1:], strict=False)), after_ee
    *_, kl_ref = _dense(res.y.numpy(), res.P.dense().double().numpy())
    assert kl[150] == pytest.approx(kl_ref, rel=1e-4)


@pytest.mark.parametrize("method", ["exact", "fft"])
def test_deterministic_with_a_seed(digits, method):
    x = torch.tensor(digits[:300])
    kw = dict(n_iter=60, early_exaggeration_iter=20, method=method)
    a = T.tsne(x, seed=3, **kw).y
    b = T.tsne(x, seed=3, **kw).y
    c = T.tsne(x, seed=4, **kw).y
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("init", ["pca", "random"])
def test_init_matches_the_shared_recipe(digits, init):
    from advlens.embed import TSNEParams, _common

    x = digits[:500]
    ref = _common.initial_positions(x, TSNEParams(init=init, seed=7))
    mine = T.pca_init(torch.tensor(x), 7, init).double().numpy()
    np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-9)
    if init == "pca":
        assert mine[:, 0].std() == pytest.approx(1e-4, rel=1e-3)


@pytest.fixture(scope="module")
def digits_graph(digits):
    from advlens.embed import knn_graph

    return knn_graph(digits, perplexity=30)


@pytest.fixture(scope="module")
def opentsne_recall(digits, digits_graph) -> float:
    from advlens.embed import embed, recall_at_k

    ref = embed(digits, engine="opentsne", n_iter=300, early_exaggeration_iter=100,
                knn=digits_graph, n_jobs=1)  # fmt: skip
    return recall_at_k(digits, ref.xy, sample=None)


@pytest.mark.long
@pytest.mark.parametrize("method", ["exact", "fft"])
def test_recall_at_least_opentsne(digits, digits_graph, opentsne_recall, method):
    from advlens.embed import recall_at_k

    # same kNN graph, schedule and learning rate (n / 12) as the openTSNE run
    idx, dist = (torch.tensor(a[:, :90]) for a in digits_graph)
    ours = T.tsne(torch.tensor(digits), knn=(idx, dist), n_iter=300, early_exaggeration_iter=100,
                  learning_rate=digits.shape[0] / 12, method=method)  # fmt: skip
    recall = recall_at_k(digits, ours.y.numpy(), sample=None)
    assert recall >= opentsne_recall - 0.03, (recall, opentsne_recall)


# ----------------------------------------------------------------------------- engine


def test_engine_contract(digits):
    from advlens.embed import available_engines, embed, get_engine, knn_graph
    from advlens.errors import ConfigError

    assert "torch" in available_engines()
    eng = get_engine("torch")
    assert eng.NAME == "torch" and eng.available()
    x = digits[:200]
    e = embed(x, engine="torch", n_iter=40, early_exaggeration_iter=10)
    assert e.xy.shape == (200, 2) and e.xy.dtype == np.float32 and e.engine == "torch"
    assert e.knn_seconds is not None and 0 <= e.knn_seconds <= e.seconds
    assert e.params["knn"] == "exact" and e.params["learning_rate"] == pytest.approx(200 / 12)
    assert e.params["repulsion"] == "exact" and e.params["k_neighbors"] == 90
    g = knn_graph(x, perplexity=30)
    e2 = embed(x, engine="torch", n_iter=40, early_exaggeration_iter=10, knn=g)
    assert e2.params["knn"] == "precomputed" and e2.knn_seconds == 0.0
    assert e2.xy.shape == (200, 2) and np.isfinite(e2.xy).all()
    with pytest.raises(ConfigError, match="neighbours per point"):
        embed(x, engine="torch", knn=(g[0][:, :10], g[1][:, :10]))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "fft"])
def test_gpu_matches_cpu(method):
    x = torch.tensor(_blobs(3000, 20, seed=6))
    P_cpu = T.affinities(x, 30.0)
    P_gpu = T.affinities(x.cuda(), 30.0)
    dense = P_cpu.dense()
    # cuBLAS and MKL round differently: a near-tie at the k-th neighbour may swap a tiny entry
    assert float((P_gpu.dense().cpu() - dense).abs().max()) <= 1e-4 * float(dense.max())
    y = torch.tensor(_layout(3000, seed=7))
    g_cpu, z_cpu = T.gradient(y, P_cpu, method=method)
    g_gpu, z_gpu = T.gradient(y.cuda(), P_gpu, method=method)
    assert _rel(g_gpu.cpu(), g_cpu) < 1e-4 and abs(float(z_gpu) / float(z_cpu) - 1) < 1e-5
    kw = dict(n_iter=30, early_exaggeration_iter=10, method=method)
    y_cpu = T.tsne(x, **kw).y
    y_gpu = T.tsne(x.cuda(), **kw).y
    assert _rel(y_gpu.cpu(), y_cpu) < 1e-2


@pytest.mark.gpu
def test_gpu_deterministic_and_sync_free():
    x = torch.tensor(_blobs(6000, 30, seed=8)).cuda()
    P = T.affinities(x, 30.0)
    y0 = T.pca_init(x, 0)
    kw = dict(early_exaggeration_iter=10, method="fft")
    a, _ = T.optimize(y0, P, n_iter=40, **kw)
    b, _ = T.optimize(y0, P, n_iter=40, **kw)
    assert torch.equal(a, b)

    def syncs(n_iter: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                T.optimize(y0, P, n_iter=n_iter, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    # the loop itself never waits for the device: the count does not grow with iterations
    assert syncs(20) == syncs(60)


@pytest.mark.gpu
def test_gpu_compiled_step_matches_eager():
    x = torch.tensor(_blobs(5000, 20, seed=9)).cuda()
    P = T.affinities(x, 30.0)
    y0 = T.pca_init(x, 0)
    kw = dict(n_iter=50, early_exaggeration_iter=20, method="fft")
    eager, _ = T.optimize(y0, P, **kw)
    fused, _ = T.optimize(y0, P, compile=True, **kw)
    assert _rel(fused.cpu(), eager.cpu()) < 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fused_attraction_equals_the_unfused_reference():
    """torch.compile's one-kernel edge forces against today's op-by-op attraction (CPU)."""
    rng = np.random.default_rng(11)
    x = torch.tensor(rng.normal(size=(400, 5)), dtype=torch.float32)
    P = T.affinities(x, 10.0)
    y = torch.tensor(rng.normal(size=(400, 2)), dtype=torch.float32)
    ref = T.attraction(y, P)
    fused = T.attraction(y, P, fused=True)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-9)
    # and against a float64 NumPy oracle of sum_j p_ij (y_i - y_j) / (1 + |y_i - y_j|^2)
    dense = P.dense().double().numpy()
    yy = y.double().numpy()
    diff = yy[:, None, :] - yy[None, :, :]
    w = dense / (1.0 + (diff**2).sum(axis=2))
    np.testing.assert_allclose(fused.numpy(), (w[:, :, None] * diff).sum(axis=1), rtol=1e-4,
                               atol=1e-9)  # fmt: skip
