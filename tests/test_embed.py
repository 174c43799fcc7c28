"""t-SNE engines: shared parameters, registry, kNN graph reuse, quality metrics, agreement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from advlens._optional import has
from advlens.embed import (
    Embedding,
    TSNEParams,
    _common,
    available_engines,
    embed,
    get_engine,
    knn_graph,
    list_engines,
    recall_at_k,
    resolve_engine,
    trustworthiness,
)
from advlens.errors import ConfigError, DataError

# One thread: deterministic and fast on a shared 2-core machine.
FAST = dict(n_iter=250, early_exaggeration_iter=100, n_jobs=1)


def clouds(n_per: int = 150, d: int = 10, shift: float = 6.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_per, d))
    b = rng.normal(size=(n_per, d))
    b[:, 0] += shift
    return np.concatenate([a, b]).astype(np.float32)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "bad",
    [
        dict(perplexity=0),
        dict(n_iter=0),
        dict(early_exaggeration_iter=1001),
        dict(early_exaggeration=0.5),
        dict(learning_rate="fast"),
        dict(learning_rate=-1.0),
        dict(init="spectral"),
        dict(n_jobs=0),
    ],
)
def test_params_reject_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TSNEParams(**bad)


def test_learning_rate_auto_is_n_over_exaggeration():
    assert _common.learning_rate(TSNEParams(), 1200) == pytest.approx(100.0)
    assert _common.learning_rate(TSNEParams(early_exaggeration=4), 1200) == pytest.approx(300.0)
    assert _common.learning_rate(TSNEParams(learning_rate=7.5), 1200) == 7.5


def test_params_from_embed_config():
    from advlens.config import EmbedConfig

    p = TSNEParams.from_config(EmbedConfig(perplexity=12.0, n_iter=600), seed=3)
    assert (p.perplexity, p.n_iter, p.seed, p.init) == (12.0, 600, 3, "pca")


def test_pca_init_matches_opentsne_recipe():
    from openTSNE.initialization import pca as ot_pca

    x = clouds()
    ours = _common.initial_positions(x, TSNEParams(seed=0))
    theirs = ot_pca(x, random_state=0, add_jitter=False)
    assert np.std(ours[:, 0]) == pytest.approx(1e-4, rel=0.02)
    for j in range(2):  # same axes up to the 1% jitter and sign
        assert abs(np.corrcoef(ours[:, j], theirs[:, j])[0, 1]) > 0.99
    rand = _common.initial_positions(x, TSNEParams(init="random", seed=1))
    assert np.std(rand) == pytest.approx(1e-4, rel=0.2)


# ------------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert list_engines() == ["sklearn", "opentsne", "cuml", "torch", "auto"]
    assert {"sklearn", "opentsne"} <= set(available_engines())
    with pytest.raises(ConfigError, match=r"closest valid names.*: opentsne"):
        get_engine("opentnse")
    with pytest.raises(ConfigError, match=r"closest valid names.*: perplexity"):
        embed(clouds(), engine="opentsne", perplexty=5)
    with pytest.raises(DataError, match="NaN"):
        embed(np.full((10, 3), np.nan, np.float32), engine="opentsne")


def test_auto_is_opentsne_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto resolves to the torch engine when it is available")
    assert resolve_engine("auto") == "opentsne"


def test_embedding_checks_its_shape():
    ok = np.zeros((5, 2), np.float32)
    Embedding(ok, 0.1, "x")
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        Embedding(np.zeros((5, 3), np.float32), 0.1, "x")
    with pytest.raises(ValueError, match="float32"):
        Embedding(ok.astype(np.float64), 0.1, "x")
    with pytest.raises(ValueError, match="NaN"):
        Embedding(np.full((5, 2), np.inf, np.float32), 0.1, "x")


def test_sklearn_refuses_fewer_than_250_iterations():
    with pytest.raises(ConfigError, match="n_iter = 100"):
        embed(clouds(), engine="sklearn", n_iter=100, n_jobs=1)


def test_cuml_missing_names_the_package():
    if has("cuml"):
        pytest.skip("cuML is installed")
    from advlens._optional import MissingDependency

    assert "cuml" not in available_engines()
    with pytest.raises(MissingDependency, match="cuml-cu12"):
        embed(clouds(), engine="cuml")


# -------------------------------------------------------------------------------- engines


@pytest.mark.parametrize("engine", ["sklearn", "opentsne"])
def test_engine_returns_seeded_finite_map(engine):
    x = clouds()
    a = embed(x, engine=engine, seed=1, **FAST)
    b = embed(x, engine=engine, seed=1, **FAST)
    c = embed(x, engine=engine, seed=2, init="random", **FAST)
    assert a.xy.shape == (300, 2) and a.xy.dtype == np.float32 and np.isfinite(a.xy).all()
    assert a.engine == engine and a.seconds > 0
    np.testing.assert_array_equal(a.xy, b.xy)
    assert not np.allclose(a.xy, c.xy)
    # the two clouds are far apart in the input: their maps must not mix
    assert recall_at_k(x, a.xy, k=10, sample=None) > 0.3
    assert trustworthiness(x, a.xy, k=10, sample=None) > 0.9


@pytest.mark.gpu
def test_cuml_engine_returns_finite_map():
    if not has("cuml"):
        pytest.skip("cuML is not installed")
    x = clouds()
    e = embed(x, engine="cuml", n_iter=500)
    assert e.xy.shape == (300, 2) and e.xy.dtype == np.float32 and np.isfinite(e.xy).all()
    assert e.params["n_neighbors"] == 90 and e.params["learning_rate"] == pytest.approx(300 / 12)
    assert trustworthiness(x, e.xy, k=10, sample=None) > 0.85


@pytest.mark.parametrize("engine", ["opentsne", "sklearn"])
def test_precomputed_knn_graph_gives_the_internal_result(engine):
    x = clouds(n_per=200)  # < 1,000 points: openTSNE's own search is exact
    own = embed(x, engine=engine, seed=0, **FAST)
    # float64 distances are what the exact search hands the affinities internally
    graph = knn_graph(x, perplexity=30, dtype=np.float64)
    given_ = embed(x, engine=engine, seed=0, knn=graph, **FAST)
    np.testing.assert_array_equal(own.xy, given_.xy)
    assert given_.knn_seconds == 0.0 and given_.params["knn"] == "precomputed"


def test_knn_graph_matches_brute_force():
    x = clouds(n_per=60, d=5, seed=3)
    idx, dist = knn_graph(x, perplexity=5)
    assert idx.shape == (120, 16) and idx.dtype == np.int64 and dist.dtype == np.float32
    full = cdist(x.astype(np.float64), x.astype(np.float64))
    np.fill_diagonal(full, np.inf)
    ref = np.argsort(full, axis=1, kind="stable")[:, :16]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(full, ref, 1), rtol=1e-5)
    with pytest.raises(ConfigError, match="needs 90"):
        embed(x, engine="opentsne", perplexity=30, knn=(idx, dist))


# ---------------------------------------------------------------------- quality metrics


def _recall_direct(x, y, k):
    dx, dy = cdist(x, x), cdist(y, y)
    np.fill_diagonal(dx, np.inf)
    np.fill_diagonal(dy, np.inf)
    a = np.argsort(dx, axis=1)[:, :k]
    b = np.argsort(dy, axis=1)[:, :k]
    return np.mean([len(set(p) & set(q)) / k for p, q in zip(a, b, strict=True)])


def test_recall_and_trustworthiness_match_direct_computation():
    from sklearn.manifold import trustworthiness as sk_trust

    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 6))
    y = x[:, :2] + rng.normal(scale=0.5, size=(200, 2))
    assert recall_at_k(x, y, k=10, sample=None) == pytest.approx(_recall_direct(x, y, 10))
    assert trustworthiness(x, y, k=10, sample=None) == pytest.approx(sk_trust(x, y, n_neighbors=10))
    # on a sample: the direct computation restricted to the sampled query rows
    where = np.sort(np.random.default_rng(0).choice(200, 50, replace=False))
    dx, dy = cdist(x[where], x), cdist(y[where], y)
    dx[np.arange(50), where] = np.inf
    dy[np.arange(50), where] = np.inf
    a, b = np.argsort(dx, 1)[:, :10], np.argsort(dy, 1)[:, :10]
    direct = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(a, b, strict=True)])
    assert recall_at_k(x, y, k=10, sample=50, seed=0) == pytest.approx(direct)
    assert trustworthiness(x, y, k=10, sample=50, seed=0) == pytest.approx(
        sk_trust(x[where], y[where], n_neighbors=10)
    )


@settings(max_examples=20, deadline=None)
@given(n=st.integers(12, 60), seed=st.integers(0, 10_000))
def test_recall_properties(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 2))
    x = np.concatenate([y * 3.0, np.zeros((n, 3))], axis=1)  # a scaled copy: same neighbours
    assert recall_at_k(x, y, k=5, sample=None) == pytest.approx(1.0)
    r = recall_at_k(rng.normal(size=(n, 4)), y, k=5, sample=None)
    assert 0.0 <= r <= 1.0


# ----------------------------------------------------- engines agree on the overlap value


def test_sklearn_and_opentsne_overlap_agree_on_synthetic_layers():
    """Issue 7: on a small two-cloud run the engines' per-layer overlap agrees within 0.1."""
    from advlens.overlap import overlap

    rng = np.random.default_rng(0)
    n = 150
    clean = rng.normal(size=(n, 20))
    clean[: n // 2, :3] += 5.0  # two classes
    is_perturbed = np.repeat([False, True], n)
    # early layer: twins almost identical; middle: half the twins moved away; late: all moved
    moved = {"early": 0.0, "middle": 0.5, "late": 1.0}
    for layer, share in moved.items():
        pert = clean + rng.normal(scale=0.3, size=clean.shape)
        pert[rng.permutation(np.arange(n) < int(share * n)), 5:8] += 12.0
        x = np.concatenate([clean, pert]).astype(np.float32)
        graph = knn_graph(x, perplexity=30)
        values = {e: overlap(embed(x, engine=e, knn=graph, **FAST).xy, is_perturbed, k=10).value
                  for e in ("sklearn", "opentsne")}  # fmt: skip
        assert abs(values["sklearn"] - values["opentsne"]) <= 0.1, (layer, values)
        if layer == "early":
            assert min(values.values()) >= 0.8
        if layer == "late":
            assert max(values.values()) <= 0.2


# ------------------------------------------------ cuML's documented contract, without cuML
# cuML needs a GPU; these stand-ins enforce what its docs say the estimator accepts, so the
# arguments advlens builds are checked here. They are not cuML and make no map of their own.


def _fake_cuml(monkeypatch, version: str, *, deprecated_n_iter: bool):
    import sys
    import types
    import warnings

    seen: dict = {}

    class TSNE:
        def __init__(self, *, max_iter=1000, n_neighbors=90, precomputed_knn=None,
                     n_iter="deprecated", **kwargs):  # fmt: skip
            if n_iter != "deprecated":
                assert deprecated_n_iter
                warnings.warn("n_iter is deprecated, use max_iter", FutureWarning, stacklevel=2)
            seen.update(kwargs, max_iter=max_iter, n_neighbors=n_neighbors)
            self.graph = precomputed_knn
            self.n_neighbors = n_neighbors

        def fit_transform(self, x, knn_graph=None):
            idx, dist = self.graph if self.graph is not None else knn_graph
            n = x.shape[0]
            if idx.shape != (n, self.n_neighbors) or dist.shape != idx.shape:
                raise ValueError("precomputed_knn must have shape (n_samples, n_neighbors)")
            if version >= "26.08" and not (
                (idx[:, 0] == np.arange(n)).all() and (dist[:, 0] == 0).all()
            ):
                raise ValueError("precomputed_knn: column 0 must hold each sample itself")
            seen["graph"] = (idx, dist)
            return np.asarray(x[:, :2], dtype=np.float32)

    cuml = types.ModuleType("cuml")
    cuml.__version__ = version
    manifold = types.ModuleType("cuml.manifold")
    manifold.TSNE = TSNE
    cuml.manifold = manifold
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.manifold", manifold)
    return seen


@pytest.mark.parametrize("version", ["26.08.00", "25.12.00"])
def test_cuml_gets_max_iter_and_a_graph_in_its_layout(monkeypatch, version):
    from advlens.embed import cuml as engine

    seen = _fake_cuml(monkeypatch, version, deprecated_n_iter=version.startswith("25"))
    x = clouds(n_per=40)
    graph = knn_graph(x, perplexity=5)
    e = engine.embed(x, TSNEParams(perplexity=5, n_iter=300), knn=graph)
    assert seen["max_iter"] == 300  # never the deprecated n_iter (warnings are errors here)
    idx, dist = seen["graph"]
    k = 15
    if version >= "26.08":  # self in column 0 at distance 0, then the k neighbours
        np.testing.assert_array_equal(idx[:, 0], np.arange(len(x)))
        assert (dist[:, 0] == 0).all() and idx.shape == (len(x), k + 1)
        np.testing.assert_array_equal(idx[:, 1:], graph[0][:, :k])
    else:
        np.testing.assert_array_equal(idx, graph[0][:, :k])
    assert (idx != np.arange(len(x))[:, None])[:, -k:].all()  # the k neighbours exclude self
    assert e.params["n_neighbors"] == k and e.params["cuml_n_neighbors"] == idx.shape[1]


def test_cuml_graph_layout_is_what_26_08_accepts():
    from advlens.embed.cuml import graph_layout

    x = clouds(n_per=30)
    idx, dist = knn_graph(x, 7)
    a, b = graph_layout(idx, dist, self_first=True)
    assert a.dtype == np.int64 and b.dtype == np.float32 and a.shape == (60, 8)
    # each row sorted by distance, as a self-inclusive exact search returns it
    assert (np.diff(b, axis=1) >= 0).all()
    np.testing.assert_allclose(b[:, 1:], cdist(x, x)[np.arange(60)[:, None], a[:, 1:]], rtol=1e-5)
