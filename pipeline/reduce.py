"""Reduce: PCA of a layer's joint (2N x D) activation matrix to ``n_components`` dimensions.

On a GPU the matrix goes through ``torch.pca_lowrank`` on the device; on the CPU through
scikit-learn's PCA (exact for small D, randomized for large D). A ``dask.array`` input is
reduced without loading it whole: the covariance is accumulated block by block when D is
small, else dask's streaming randomized SVD (``svd_compressed``) is used.
"""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import torch
from sklearn.decomposition import PCA

from advlens._env import resolve_device

log = logging.getLogger(__name__)

# Below this width the D x D covariance is small enough to accumulate exactly.
EXACT_COV_MAX_D = 4096


def reduce(
    x: np.ndarray | da.Array, n_components: int = 50, *, seed: int = 0, device: str = "auto"
) -> np.ndarray:
    """Project rows of ``x`` onto their top principal components.

    Parameters
    ----------
    x : ndarray or dask.array.Array, shape (n, d)
        Joint matrix (clean rows, then perturbed rows).
    n_components : int
        Target dimension; ``min(n_components, d, n)`` is used.
    seed : int
        Seed of the randomized solvers.
    device : str
        ``auto``, ``cpu`` or a CUDA device.

    Returns
    -------
    ndarray, shape (n, min(n_components, d, n)), float32
    """
    n, d = x.shape
    q = min(n_components, d, n)
    if d <= n_components:
        # Nothing to reduce: PCA would only rotate. Keep the raw coordinates (centred).
        arr = np.asarray(x, dtype=np.float32)
        return arr - arr.mean(axis=0, keepdims=True)
    if not isinstance(x, np.ndarray):
        return _reduce_dask(x, q, seed)
    device = str(resolve_device(device))
    if device.startswith("cuda"):
        return _reduce_torch(x, q, seed, device)

    # covariance_eigh: exact, and far faster than a full SVD when n >> d (70,000 x 784: 10x).
    solver = "covariance_eigh" if d <= EXACT_COV_MAX_D else "randomized"
    pca = PCA(n_components=q, svd_solver=solver, random_state=seed)
    return pca.fit_transform(np.asarray(x, dtype=np.float32)).astype(np.float32, copy=False)


def _reduce_torch(x: np.ndarray, q: int, seed: int, device: str) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    t = t - t.mean(dim=0, keepdim=True)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, _, v = torch.pca_lowrank(t, q=min(q + 10, *t.shape), center=False, niter=4)
    finally:
        torch.random.set_rng_state(gen_state)
    out = t @ v[:, :q]
    return _fix_signs(out.cpu().numpy())


def _reduce_dask(x, q: int, seed: int) -> np.ndarray:
    # Row blocks with whole rows: the store chunks along samples only, so this is free there.
    x = x.astype(np.float32).rechunk({1: -1})
    d = x.shape[1]
    if d <= EXACT_COV_MAX_D:
        # Two streaming passes: mean, then covariance; exact like a full PCA.
        mean = x.mean(axis=0).compute().astype(np.float64)
        cov = np.zeros((d, d), dtype=np.float64)
        for block in x.to_delayed().ravel():
            b = np.asarray(block.compute(), dtype=np.float64) - mean
            cov += b.T @ b
        _, vecs = np.linalg.eigh(cov)
        comps = vecs[:, ::-1][:, :q]
        out = (x - mean.astype(np.float32)) @ comps.astype(np.float32)
        return _fix_signs(np.asarray(out.compute(), dtype=np.float32))
    xc = x - x.mean(axis=0)
    u, s, _ = da.linalg.svd_compressed(xc, k=q, compute=False, seed=seed)
    return _fix_signs(np.asarray((u * s).compute(), dtype=np.float32))


def _fix_signs(y: np.ndarray) -> np.ndarray:
    """Make each component's largest-magnitude entry positive, as scikit-learn's svd_flip does."""
    idx = np.argmax(np.abs(y), axis=0)
    signs = np.sign(y[idx, np.arange(y.shape[1])])
    signs[signs == 0] = 1
    return (y * signs).astype(np.float32, copy=False)
