"""Exact 2-D kNN on the GPU: the grid of :mod:`advlens.kernels.grid`, binned by a counting sort,
then one CUDA thread per query point (cupy.RawModule).

Each thread scans the cells of Chebyshev ring 0, 1, 2, ... around its point's cell into a
per-thread buffer of the k best (squared distance, index) pairs kept sorted by insertion, and stops
after the first ring whose certainty bound holds (the same bound as the NumPy reference). Distances
use ``__dmul_rn``/``__dadd_rn`` so that the compiler cannot fuse them into an FMA: the squared
distances, hence the neighbour order and ties, are bit-identical to the NumPy reference's.

Threads run in cell order (thread t handles the t-th point after binning), so a warp's threads
scan the same or neighbouring cells and share the candidate loads through the caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from advlens._optional import require
from advlens.errors import ConfigError
from advlens.kernels.grid import Grid, cell_coords, plan_grid

MAX_K = 64  # per-thread buffer size (registers/local memory)
BLOCK = 128

SOURCE = r"""
#ifndef KNN_K
#define KNN_K 10
#endif

__device__ __forceinline__ bool knn_less(double da, long long ia, double db, long long ib)
{
    return da < db || (da == db && ia < ib);
}

// scatter point i to the next free slot of its cell (counting sort; order inside a cell is
// arbitrary, which is harmless: ties are broken by index, not by position)
extern "C" __global__ void knn2d_bin(
    const double* __restrict__ x, const double* __restrict__ y,
    const long long* __restrict__ cell, unsigned long long* __restrict__ fill,
    double* __restrict__ xs, double* __restrict__ ys, long long* __restrict__ ids,
    long long* __restrict__ cells, const long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long c = cell[i];
    const long long p = (long long)atomicAdd(&fill[c], 1ULL);
    xs[p] = x[i];
    ys[p] = y[i];
    ids[p] = i;
    cells[p] = c;
}

__device__ __forceinline__ void knn_scan(
    const long long lo, const long long hi, const double* __restrict__ xs,
    const double* __restrict__ ys, const long long* __restrict__ ids,
    const double qx, const double qy, const long long qi,
    double* bd, long long* bi, int& cnt)
{
    for (long long j = lo; j < hi; ++j) {
        const long long id = ids[j];
        if (id == qi) continue;
        const double dx = __dsub_rn(xs[j], qx);
        const double dy = __dsub_rn(ys[j], qy);
        const double d2 = __dadd_rn(__dmul_rn(dx, dx), __dmul_rn(dy, dy));
        int p;
        if (cnt < KNN_K) {
            p = cnt++;
        } else if (knn_less(d2, id, bd[KNN_K - 1], bi[KNN_K - 1])) {
            p = KNN_K - 1;
        } else {
            continue;
        }
        while (p > 0 && knn_less(d2, id, bd[p - 1], bi[p - 1])) {
            bd[p] = bd[p - 1];
            bi[p] = bi[p - 1];
            --p;
        }
        bd[p] = d2;
        bi[p] = id;
    }
}

extern "C" __global__ void knn2d_grid(
    const double* __restrict__ xs, const double* __restrict__ ys,
    const long long* __restrict__ ids, const long long* __restrict__ cells,
    const long long* __restrict__ start, const long long n, const int gx, const int gy,
    const double x0, const double y0, const double h, const double slack,
    long long* __restrict__ out_idx, double* __restrict__ out_dist, int* __restrict__ out_rings)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const double qx = xs[t], qy = ys[t];
    const long long qi = ids[t];
    const long long c = cells[t];
    const int cx = (int)(c % gx), cy = (int)(c / gx);
    const double ux = (qx - x0) / h, uy = (qy - y0) / h;
    const double inf = __longlong_as_double(0x7ff0000000000000LL);
    const int rmax = gx > gy ? gx : gy;
    double bd[KNN_K];
    long long bi[KNN_K];
    int cnt = 0;
    int r = 0;
    for (; r <= rmax; ++r) {
        const int xlo = cx - r > 0 ? cx - r : 0;
        const int xhi = cx + r < gx - 1 ? cx + r : gx - 1;
        for (int yy = cy - r; yy <= cy + r; ++yy) {
            if (yy < 0 || yy >= gy) continue;
            const long long row = (long long)yy * gx;
            if (yy == cy - r || yy == cy + r) {  // top or bottom side: one contiguous run
                knn_scan(start[row + xlo], start[row + xhi + 1], xs, ys, ids, qx, qy, qi, bd, bi, cnt);
            } else {  // left and right sides: one cell each
                if (cx - r >= 0)
                    knn_scan(start[row + cx - r], start[row + cx - r + 1], xs, ys, ids, qx, qy, qi,
                             bd, bi, cnt);
                if (cx + r < gx)
                    knn_scan(start[row + cx + r], start[row + cx + r + 1], xs, ys, ids, qx, qy, qi,
                             bd, bi, cnt);
            }
        }
        // distance to the nearest side of the searched block that has cells behind it
        double gap = inf;
        if (cx - r > 0) { const double g = ux - (double)(cx - r); gap = g < gap ? g : gap; }
        if (cx + r < gx - 1) { const double g = (double)(cx + r + 1) - ux; gap = g < gap ? g : gap; }
        if (cy - r > 0) { const double g = uy - (double)(cy - r); gap = g < gap ? g : gap; }
        if (cy + r < gy - 1) { const double g = (double)(cy + r + 1) - uy; gap = g < gap ? g : gap; }
        if (gap == inf) break;  // every cell searched
        if (cnt == KNN_K && sqrt(bd[KNN_K - 1]) / h < gap - slack) break;
    }
    for (int m = 0; m < KNN_K; ++m) {
        out_idx[qi * KNN_K + m] = bi[m];
        out_dist[qi * KNN_K + m] = sqrt(bd[m]);
    }
    out_rings[qi] = r;
}
"""

# C types of the kernels' parameters, in order (used by the CPU emulation in the tests too)
SIGNATURES = {
    "knn2d_bin": ("double*", "double*", "long long*", "unsigned long long*", "double*", "double*",
                  "long long*", "long long*", "long long"),
    "knn2d_grid": ("double*", "double*", "long long*", "long long*", "long long*", "long long",
                   "int", "int", "double", "double", "double", "double", "long long*", "double*",
                   "int*"),
}  # fmt: skip

Launch = Callable[[str, int, tuple], None]


def default_ppc(k: int) -> float:
    """Target points per cell on the GPU: small cells, most points finish after ring 1 or 2."""
    return max(1.0, 0.5 * k)


def run_grid_knn(
    xy: Any, k: int, xp: Any, launch: Launch, *, ppc: float | None = None, grid: Grid | None = None
) -> tuple[Any, Any, Any]:
    """Plan, bin and search with the kernels in ``SOURCE``; ``launch(name, n_threads, args)`` runs
    one kernel (on the GPU through cupy, or emulated on the CPU by the tests); ``grid``
    overrides the planned grid.

    Returns ``(idx (n, k) int64, dist (n, k) float64, rings (n,) int32)`` in ``xp``.
    """
    n = int(xy.shape[0])
    x = xp.ascontiguousarray(xy[:, 0], dtype=xp.float64)
    y = xp.ascontiguousarray(xy[:, 1], dtype=xp.float64)
    if grid is None:
        grid, _, _, cx, cy = plan_grid(x, y, ppc or default_ppc(k), xp)
    else:
        _, _, cx, cy = cell_coords(x, y, grid, xp)
    cell = cy * grid.gx + cx
    start = xp.zeros(grid.n_cells + 1, dtype=xp.int64)
    start[1:] = xp.cumsum(xp.bincount(cell, minlength=grid.n_cells))
    fill = start[:-1].astype(xp.uint64)
    xs = xp.empty(n, xp.float64)
    ys = xp.empty(n, xp.float64)
    ids = xp.empty(n, xp.int64)
    cells = xp.empty(n, xp.int64)
    launch("knn2d_bin", n, (x, y, cell, fill, xs, ys, ids, cells, np.int64(n)))
    out_idx = xp.empty((n, k), xp.int64)
    out_dist = xp.empty((n, k), xp.float64)
    rings = xp.empty(n, xp.int32)
    args = (xs, ys, ids, cells, start, np.int64(n), np.int32(grid.gx), np.int32(grid.gy),
            np.float64(grid.x0), np.float64(grid.y0), np.float64(grid.h),
            np.float64(grid.slack), out_idx, out_dist, rings)  # fmt: skip
    launch("knn2d_grid", n, args)
    return out_idx, out_dist, rings


@functools.lru_cache(maxsize=16)
def _module(k: int) -> Any:
    cp = require("cupy", "the GPU kNN kernel")
    return cp.RawModule(code=SOURCE, options=(f"-DKNN_K={k}",))


def knn2d_cuda(
    xy: Any, k: int, *, ppc: float | None = None, grid: Grid | None = None
) -> tuple[Any, Any, Any]:
    """Exact kNN of cupy (n, 2) points on the current GPU; see :func:`run_grid_knn`."""

    cp = require("cupy", "the GPU kNN kernel")
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"k = {k}: the GPU kernel supports 1 <= k <= {MAX_K}")
    mod = _module(k)

    def launch(name: str, n_threads: int, args: tuple) -> None:
        blocks = (n_threads + BLOCK - 1) // BLOCK
        mod.get_function(name)((blocks,), (BLOCK,), args)

    return run_grid_knn(cp.asarray(xy), k, cp, launch, ppc=ppc, grid=grid)
