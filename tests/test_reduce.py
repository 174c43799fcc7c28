"""reduce: PCA against scikit-learn's exact PCA as the oracle."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from advlens.reduce import pca_blocks, reduce


def _low_rank(n=300, d=120, rank=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) * 3
        + rng.normal(scale=0.1, size=(n, d))
    ).astype(np.float32)


def _same_subspace(a, b, q):
    # Compare up to per-component sign: |corr| of matching components ~ 1.
    for j in range(q):
        c = np.corrcoef(a[:, j], b[:, j])[0, 1]
        assert abs(c) > 0.999, (j, c)


def test_numpy_matches_sklearn_full_pca():
    x = _low_rank()
    ref = PCA(n_components=5, svd_solver="full").fit_transform(x)
    out = reduce(x, 5, device="cpu")
    assert out.shape == (300, 5) and out.dtype == np.float32
    _same_subspace(out, ref, 5)


@pytest.mark.parametrize("rows", [64, 300])
@pytest.mark.parametrize("exact_max_d", [4096, 50])
def test_streamed_blocks_match_numpy(rows, exact_max_d):
    x = _low_rank()
    ref = PCA(n_components=6, svd_solver="full").fit_transform(x)
    blocks = lambda: ((r0, x[r0 : r0 + rows]) for r0 in range(0, 300, rows))  # noqa: E731
    out = pca_blocks(blocks, 300, 120, 6, exact_max_d=exact_max_d, device="cpu").scores
    assert out.shape == (300, 6)
    _same_subspace(out, ref, 6)


def test_narrow_input_is_centred_not_projected():
    x = _low_rank(d=10)
    out = reduce(x, 50)
    assert out.shape == (300, 10)
    np.testing.assert_allclose(out, x - x.mean(0), atol=1e-5)


def test_variance_is_maximal_in_first_component():
    x = _low_rank(seed=3)
    out = reduce(x, 4, device="cpu")
    var = out.var(axis=0)
    assert np.all(np.diff(var) <= 1e-4)
