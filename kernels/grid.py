"""Exact 2-D kNN by uniform-grid hashing: the grid plan (shared with the GPU kernel) and the
vectorised NumPy reference that is the GPU kernel's test oracle.

Ordering: neighbours are sorted by the squared distance ``dx*dx + dy*dy`` computed in float64
(the GPU kernel computes it with the same IEEE operations, no FMA), then by index. Returned
distances are ``sqrt`` of that value.

Certainty: after all cells within Chebyshev ring ``r`` of a query's cell are searched, every
unsearched point lies beyond the searched block, so at least ``gap`` away, ``gap`` being the
distance from the query to the nearest side of the block that has cells behind it (sides on the
grid's edge have none). The k found neighbours are final once the k-th distance is strictly below
``gap`` (strictly: an unsearched point at exactly that distance could win the index tie-break),
minus a floating-point slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Fraction of points at each end of an axis left out of the grid's box: a few far outliers would
# otherwise stretch the grid and crowd everything else into a handful of cells. Left-out points
# are clipped into the edge cells, which keeps the certainty bound valid (see module docstring).
OUTLIER_QUANTILE = 0.01
MAX_CELLS_PER_POINT = 4  # cap on grid cells relative to n (memory for the cell table)


@dataclass(frozen=True)
class Grid:
    """A uniform grid: cell (cx, cy) covers [x0 + cx*h, x0 + (cx+1)*h) x [y0 + cy*h, ...)."""

    x0: float
    y0: float
    h: float
    gx: int
    gy: int
    slack: float  # in cell units; absorbs rounding in cell coordinates and distances

    @property
    def n_cells(self) -> int:
        return self.gx * self.gy


def default_ppc(k: int) -> float:
    """Target points per occupied cell for the NumPy reference (tuned on a CPU)."""
    return max(1.0, 0.8 * k)


def _box(v: Any, xp: Any) -> tuple[float, float]:
    n = v.shape[0]
    if n >= 1000:
        lo, hi = (
            float(t) for t in xp.quantile(v, xp.asarray([OUTLIER_QUANTILE, 1 - OUTLIER_QUANTILE]))
        )
        if hi > lo:
            return lo, hi
    return float(v.min()), float(v.max())


def cell_coords(x: Any, y: Any, grid: Grid, xp: Any) -> tuple[Any, Any, Any, Any]:
    """Cell coordinates ``(ux, uy)`` (float64) and clipped integer cells ``(cx, cy)``."""
    ux = (x - grid.x0) / grid.h
    uy = (y - grid.y0) / grid.h
    cx = xp.clip(xp.floor(ux), 0, grid.gx - 1).astype(xp.int64)
    cy = xp.clip(xp.floor(uy), 0, grid.gy - 1).astype(xp.int64)
    return ux, uy, cx, cy


def plan_grid(x: Any, y: Any, ppc: float, xp: Any = np) -> tuple[Grid, Any, Any, Any, Any]:
    """Choose a grid with about ``ppc`` points per occupied cell for float64 coordinates x, y.

    Starts from the box's area, then shrinks the cells while the point-weighted mean occupancy
    (sum of squared counts / n: the number of candidates a point sees in its own cell) is over
    twice the target, which adapts to clustered maps. Returns the grid and ``cell_coords``.
    """
    n = int(x.shape[0])
    x0, x1 = _box(x, xp)
    y0, y1 = _box(y, xp)
    span = max(x1 - x0, y1 - y0)
    max_abs = max(float(xp.abs(x).max()), float(xp.abs(y).max()))
    if span <= 0:  # all points identical: one cell holds everything
        grid = Grid(x0, y0, 1.0, 1, 1, 1e-12 * (max_abs + 3))
        return (grid, *cell_coords(x, y, grid, xp))
    ex, ey = max(x1 - x0, span * 1e-9), max(y1 - y0, span * 1e-9)
    target = max(n / ppc, 1.0)
    h = math.sqrt(ex * ey / target)
    if h > min(ex, ey):  # a thin strip: one row of cells along the long side
        h = max(ex, ey) / target
    max_cells = MAX_CELLS_PER_POINT * n + 16
    for attempt in range(5):
        gx = max(1, math.ceil(ex / h))
        gy = max(1, math.ceil(ey / h))
        if gx * gy > max_cells:
            h *= math.sqrt(gx * gy / max_cells) * 1.001
            gx, gy = max(1, math.ceil(ex / h)), max(1, math.ceil(ey / h))
        # 64-bit cell ids and float64 cell coordinates must stay exact
        grid = Grid(x0, y0, h, gx, gy, 1e-12 * (max_abs / h + gx + gy + 3))
        ux, uy, cx, cy = cell_coords(x, y, grid, xp)
        if attempt == 4 or gx * gy * 2 > max_cells:
            break
        counts = xp.bincount(cy * gx + cx, minlength=gx * gy)
        occupancy = float((counts.astype(xp.float64) ** 2).sum()) / n
        if occupancy <= 2 * ppc:
            break
        h /= math.sqrt(occupancy / ppc)
    return grid, ux, uy, cx, cy


def block_gap(u: Any, c: Any, r: Any, g: int, xp: Any) -> Any:
    """Distance (cell units) from coordinate ``u`` in cell ``c`` to the sides of the block of
    half-width ``r`` along one axis that have cells behind them (inf where none)."""
    inf = xp.inf
    lo = xp.where(c - r > 0, u - (c - r), inf)
    hi = xp.where(c + r < g - 1, (c + r + 1) - u, inf)
    return xp.minimum(lo, hi)


def knn2d_reference(
    xy: np.ndarray,
    k: int,
    *,
    ppc: float | None = None,
    grid: Grid | None = None,
    queries: np.ndarray | None = None,
    budget: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of 2-D points (self excluded, ties by index) by grid hashing, in NumPy.

    ``xy``: (n, 2) finite array, ``1 <= k <= n - 1`` (validated by the caller). ``grid``
    overrides the planned grid (tests: cell borders on the points); ``queries``: search only
    these point indices (default all); ``budget`` caps the (queries x candidates) elements held
    at once. Returns ``(idx (m, k) int64, dist (m, k) float64)`` for the m queries.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    x = np.ascontiguousarray(xy[:, 0])
    y = np.ascontiguousarray(xy[:, 1])
    if grid is None:
        grid, ux, uy, cx, cy = plan_grid(x, y, ppc or default_ppc(k))
    else:
        ux, uy, cx, cy = cell_coords(x, y, grid, np)
    gx, n_cells = grid.gx, grid.n_cells
    cell = cy * gx + cx
    order = np.argsort(cell, kind="stable")
    start = np.zeros(n_cells + 1, np.int64)
    np.cumsum(np.bincount(cell, minlength=n_cells), out=start[1:])
    # sorted coordinates with an infinitely far sentinel at position n (padding)
    xs = np.append(x[order], np.inf)
    ys = np.append(y[order], np.inf)
    ids = np.append(order, n)

    out_i = np.empty((n, k), np.int64)
    out_d2 = np.empty((n, k), np.float64)
    pending = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    rad = np.ones(n, np.int64)
    rmax = max(grid.gx, grid.gy)
    st = _State(grid, start, xs, ys, ids, x, y, cx, cy, k)
    while pending.size:
        still = []
        for q, idx, d2 in st.search(pending, rad[pending], budget):
            kth = d2[:, k - 1]
            r = rad[q]
            gap = np.minimum(
                block_gap(ux[q], cx[q], r, grid.gx, np), block_gap(uy[q], cy[q], r, grid.gy, np)
            )
            kth_u = np.sqrt(kth) / grid.h
            done = np.isfinite(kth) & (np.isinf(gap) | (kth_u < gap - grid.slack))
            out_i[q[done]] = idx[done]
            out_d2[q[done]] = d2[done]
            q, kth_u, gap, r = q[~done], kth_u[~done], gap[~done], r[~done]
            # the smallest ring whose gap would exceed the current k-th distance
            grow = np.where(np.isfinite(kth_u), np.floor(kth_u + grid.slack - gap) + 1, r + 1)
            rad[q] = np.minimum(r + np.maximum(grow, 1).astype(np.int64), rmax)
            still.append(q)
        pending = np.concatenate(still) if still else pending[:0]
    if queries is not None:
        return out_i[queries], np.sqrt(out_d2[queries])
    return out_i, np.sqrt(out_d2)


class _State:
    """Candidate gathering for one search round (queries grouped by (ring, cell))."""

    def __init__(self, grid, start, xs, ys, ids, x, y, cx, cy, k):
        self.grid, self.start, self.xs, self.ys, self.ids = grid, start, xs, ys, ids
        self.x, self.y, self.cx, self.cy, self.k = x, y, cx, cy, k

    def search(self, q, r, budget):
        """Yield ``(queries, idx (m,k), d2 (m,k))`` for chunks of the queries ``q`` searched over
        the full (2r+1)^2 block of cells around their own cell."""
        g = self.grid
        key = r * g.n_cells + self.cy[q] * g.gx + self.cx[q]
        ukey, inv = np.unique(key, return_inverse=True)
        g_r = ukey // g.n_cells
        g_cell = ukey % g.n_cells
        rows = _block_rows(g_cell % g.gx, g_cell // g.gx, g_r, g, self.start)
        size = np.bincount(rows[0], weights=rows[2], minlength=len(ukey)).astype(np.int64)
        # visit queries by ascending candidate count so that padding stays small
        qorder = np.lexsort((inv, size[inv]))
        q, inv = q[qorder], inv[qorder]
        qsize = size[inv]
        a = 0
        while a < len(q):
            # largest b with (b - a) * qsize[b - 1] <= budget (qsize ascending), at least a + 1
            lo, hi = a + 1, len(q)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - a) * qsize[mid - 1] <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            b = lo
            yield (q[a:b], *self._chunk(q[a:b], inv[a:b], rows, size))
            a = b

    def _chunk(self, q, gid, rows, size):
        k1 = self.k + 1  # the point itself is among the candidates; removed at the end
        sentinel = len(self.xs) - 1
        groups, local = np.unique(gid, return_inverse=True)
        pos = _candidates(groups, rows, size, sentinel)  # (ng, M) sorted positions
        if pos.shape[1] < k1:  # too few candidates: pad (the query stays pending)
            pos = np.pad(pos, ((0, 0), (0, k1 - pos.shape[1])), constant_values=sentinel)
        # gather whole rows per group, then expand to queries (row copies, not element gathers)
        d2 = self.xs[pos][local]
        d2 -= self.x[q][:, None]
        d2 *= d2
        dy = self.ys[pos][local]
        dy -= self.y[q][:, None]
        dy *= dy
        d2 += dy
        m = len(q)
        v = np.partition(d2, k1 - 1, axis=1)[:, k1 - 1] if d2.shape[1] > k1 else d2.max(axis=1)
        mask = d2 <= v[:, None]
        tied = np.count_nonzero(mask, axis=1) > k1  # ties at the k-th value: decide by index
        mask[tied] = False
        reg = np.flatnonzero(~tied)
        cols = np.nonzero(mask)[1].reshape(-1, k1)
        sel_pos = np.empty((m, k1), np.int64)
        sel_d2 = np.empty((m, k1), np.float64)
        sel_pos[reg] = pos[local[reg][:, None], cols]
        sel_d2[reg] = np.take_along_axis(d2[reg], cols, axis=1)
        if tied.any():
            t = np.flatnonzero(tied)
            all_pos = pos[local[t]]
            o = np.lexsort((self.ids[all_pos], d2[t]), axis=1)[:, :k1]
            sel_pos[t] = np.take_along_axis(all_pos, o, axis=1)
            sel_d2[t] = np.take_along_axis(d2[t], o, axis=1)
        sel_id = self.ids[sel_pos]
        o = np.lexsort((sel_id, sel_d2), axis=1)
        sel_id = np.take_along_axis(sel_id, o, axis=1)
        sel_d2 = np.take_along_axis(sel_d2, o, axis=1)
        # drop the point itself, or the last one when self ranks beyond k+1 (many duplicates)
        keep = sel_id != q[:, None]
        keep[keep.all(axis=1), k1 - 1] = False
        return sel_id[keep].reshape(m, self.k), sel_d2[keep].reshape(m, self.k)


def _block_rows(cx, cy, r, grid, start):
    """Row segments of each group's block: (group id, first sorted position, length)."""
    x_lo = np.maximum(cx - r, 0)
    x_hi = np.minimum(cx + r, grid.gx - 1)
    y_lo = np.maximum(cy - r, 0)
    n_rows = np.minimum(cy + r, grid.gy - 1) - y_lo + 1
    row_g = np.repeat(np.arange(len(cx)), n_rows)
    first = np.cumsum(n_rows) - n_rows
    row_y = y_lo[row_g] + np.arange(len(row_g)) - first[row_g]
    base = row_y * grid.gx
    seg_start = start[base + x_lo[row_g]]
    seg_len = start[base + x_hi[row_g] + 1] - seg_start
    return row_g, seg_start, seg_len


def _candidates(groups, rows, size, sentinel):
    """(len(groups), max size) matrix of sorted positions of each group's candidates."""
    row_g, seg_start, seg_len = rows
    # row segments of the wanted groups (row_g is sorted by group)
    lo = np.searchsorted(row_g, groups, side="left")
    hi = np.searchsorted(row_g, groups, side="right")
    counts = hi - lo
    sel = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    s_len = seg_len[sel]
    s_grp = np.repeat(np.arange(len(groups)), counts)
    total = int(s_len.sum())
    elem_seg = np.repeat(np.arange(len(sel)), s_len)
    seg_off = np.cumsum(s_len) - s_len
    within_seg = np.arange(total) - seg_off[elem_seg]
    pos = seg_start[sel][elem_seg] + within_seg
    g_size = size[groups]
    g_off = np.cumsum(g_size) - g_size
    elem_grp = s_grp[elem_seg]
    col = np.arange(total) - g_off[elem_grp]
    out = np.full((len(groups), int(g_size.max())), sentinel, np.int64)
    out[elem_grp, col] = pos
    return out
