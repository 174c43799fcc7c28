"""Public kNN entry points: dispatch on the array type, validate, return the input's array type.

``knn2d``: numpy -> grid reference (:mod:`.grid`) or, for large inputs, cKDTree made exact
(:mod:`.kdtree`), cupy -> CUDA kernel (:mod:`.grid_cuda`),
torch CUDA -> cupy via DLPack (no host copy), torch CPU -> numpy.
``knn``: chunked brute force in torch (:mod:`.bruteforce`) on the input's device.
Both: self excluded, neighbours sorted by (distance, index); ``1 <= k <= n - 1``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch

from advlens._env import has_cuda
from advlens._optional import has
from advlens.errors import ConfigError, closest
from advlens.kernels._arrays import check_k, check_points, is_cupy, is_torch, to_backend
from advlens.kernels.bruteforce import knn_torch
from advlens.kernels.grid import knn2d_reference
from advlens.kernels.grid_cuda import knn2d_cuda
from advlens.kernels.kdtree import knn2d_kdtree

GPU_MIN_POINTS = 20_000  # below this, "auto" keeps host arrays on the CPU (launch overheads)
# cKDTree (all cores) against the single-threaded NumPy grid: about even on 2 busy cores at 2e5
# points, ~10x faster with 16 cores (issue 6: 1.2 s for 2e6 points)
KDTREE_MIN_POINTS = 20_000
KDTREE_MIN_CORES = 4
DEVICES = ("auto", "cpu", "cuda")
METHODS = ("auto", "grid", "kdtree")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _out_dtype(dtype: Any) -> Any:
    return dtype if dtype in (np.float32, np.float64) else np.float64


def knn2d(xy: Any, k: int, *, method: str = "auto", ppc: float | None = None) -> tuple[Any, Any]:
    """Exact k nearest neighbours of 2-D points, the point itself excluded, ties by index.

    Parameters
    ----------
    xy : (n, 2) numpy, cupy or torch (CPU or CUDA) array, finite.
    k : neighbours per point, ``1 <= k <= n - 1`` (else :class:`~advlens.errors.ConfigError`).
    method : for host arrays: "grid" (the NumPy reference), "kdtree" (SciPy's cKDTree on all
        cores, made exact; same results), "auto" (kdtree from ``KDTREE_MIN_POINTS`` points).
        Device arrays always use the CUDA grid kernel.
    ppc : target points per grid cell (tuning; default depends on k and the backend).

    Returns
    -------
    idx : (n, k) int64, dist : (n, k) float (float32 for float32 input, else float64), both of
    ``xy``'s array type and device, sorted by (squared float64 distance, index).
    """
    arr, xp, back = to_backend(xy, "kNN on torch CUDA tensors")
    check_points(arr, xp, 2)
    k = check_k(k, int(arr.shape[0]))
    if method not in METHODS:
        raise ConfigError(f"method = {method!r}: {closest(str(method), METHODS)}")
    if xp is np:
        big = arr.shape[0] >= KDTREE_MIN_POINTS and _cores() >= KDTREE_MIN_CORES
        if method == "kdtree" or (method == "auto" and big):
            idx, dist = knn2d_kdtree(arr, k)
        else:
            idx, dist = knn2d_reference(arr, k, ppc=ppc)
    else:
        idx, dist, _ = knn2d_cuda(arr, k, ppc=ppc)
    return back(idx), back(dist.astype(_out_dtype(arr.dtype), copy=False))


def knn(x: Any, k: int) -> tuple[Any, Any]:
    """Exact k nearest neighbours of (n, d) points: self excluded, ties by index.

    numpy and torch CPU inputs run on the CPU, cupy and torch CUDA inputs on their GPU (chunked
    Gram-matrix brute force, certified and recomputed exactly). Returns ``(idx (n, k) int64,
    dist (n, k))`` of the input's array type; dist dtype as in :func:`knn2d`.
    """

    if is_torch(x):
        t = x.detach()
        check_points(t, torch, None)
        k = check_k(k, t.shape[0])
        idx, dist = knn_torch(t, k)
        return idx, dist.to(t.dtype if t.dtype in (torch.float32, torch.float64) else dist.dtype)
    if is_cupy(x):
        cp = sys.modules["cupy"]
        idx, dist = knn(torch.from_dlpack(x), k)
        return cp.from_dlpack(idx), cp.from_dlpack(dist)
    arr = np.asarray(x)
    check_points(arr, np, None)
    k = check_k(k, arr.shape[0])
    idx, dist = knn_torch(torch.from_numpy(np.ascontiguousarray(arr)), k)
    return idx.numpy(), dist.numpy().astype(_out_dtype(arr.dtype), copy=False)


def gpu_available(what: str) -> bool:
    """Whether a CUDA device can run ``what`` ("knn2d": needs cupy; "knn": needs torch CUDA)."""
    if what == "knn2d":
        if not has("cupy"):
            return False
        cp = sys.modules["cupy"]
        try:
            return cp.cuda.runtime.getDeviceCount() > 0
        except Exception:  # no driver: cupy imports but cannot see a device
            return False
    return has_cuda()


def place(x: Any, device: str, what: str) -> Any:
    """Move a host array (numpy, torch CPU) to the GPU when ``device`` asks for it ("auto": when
    one is usable and there are at least ``GPU_MIN_POINTS`` points). GPU arrays stay put."""
    if device not in DEVICES:
        raise ConfigError(f"device = {device!r}: {closest(device, DEVICES)}")
    if is_torch(x) and not x.is_cuda:
        x = x.detach().numpy()
    if is_torch(x) or is_cupy(x) or device == "cpu":
        return x
    n = int(np.shape(x)[0])
    if device == "auto" and (n < GPU_MIN_POINTS or not gpu_available(what)):
        return x
    if device == "cuda" and not gpu_available(what):
        need = "cupy and a CUDA GPU" if what == "knn2d" else "torch with a CUDA GPU"
        raise ConfigError(f"device = 'cuda' needs {need}; use device='cpu' or 'auto'")
    if what == "knn2d":
        return sys.modules["cupy"].asarray(x)

    return torch.as_tensor(np.asarray(x), device="cuda")
