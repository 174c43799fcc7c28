"""Exact kNN of high-dimensional points by chunked brute force (torch, CPU or CUDA).

Candidates come from the Gram-matrix distances ``|q|^2 + |x|^2 - 2 q.x`` (one matrix product per
chunk, then ``topk``); their squared distances are recomputed exactly as ``sum((x_j - q)^2)`` in
float64 and sorted by (distance, index). The candidate set is certified: every other point's
Gram distance is at least the cut-off, so its exact distance is at least the cut-off minus a
rounding bound; rows where the k-th exact distance is not strictly below that (exact ties,
duplicates) are redone against all points.

Blocks: ``ROWS`` query rows (at least ``MIN_ROWS``, whatever n) against column tiles of at most
``budget // rows`` points; each tile's ``topk`` is merged into a running top-kk per row, so no
(rows x n) score matrix is ever written and the row count does not shrink as n grows. Rows that
fail the certificate are collected on the device and read back once per tier (no host sync per
block).
"""

from __future__ import annotations

from typing import Any

import torch

EXTRA = 8  # spare candidates beyond k + 1, so that the certificate almost always holds
MAX_ROWS = 4096  # query rows per block


def budget(device: torch.device | str) -> int:
    """Elements of one score tile and of one re-ranking block: 2^24 on a CPU, 2^27 on a GPU."""
    return 1 << 27 if getattr(device, "type", str(device)) == "cuda" else 1 << 24


def block_shape(n: int, kk: int, d: int, elements: int) -> tuple[int, int]:
    """(query rows, column tile) for ``n`` points, ``kk`` candidates, dimension ``d``.

    The rows are set by the (rows x kk x d) re-ranking block alone, so they do not shrink as
    n grows (the old 2^24 / n gave 8 rows at 2e6 points); the tile takes the rest of the budget.
    """
    rows = max(1, min(MAX_ROWS, n, elements // max(1, kk * d)))
    tile = max(min(kk, n), min(n, elements // rows))
    return rows, tile


def _row_sort(d2: Any, ids: Any) -> tuple[Any, Any]:
    """Sort each row by (d2, id) with two stable sorts."""

    o = torch.argsort(ids, dim=1, stable=True)
    d2, ids = d2.gather(1, o), ids.gather(1, o)
    o = torch.argsort(d2, dim=1, stable=True)
    return d2.gather(1, o), ids.gather(1, o)


def _drop_self(d2: Any, ids: Any, rows: Any, k: int) -> tuple[Any, Any]:
    """Remove each row's own index (or its last entry when the point itself is not listed).

    Gathers instead of boolean masks, which would synchronise with the host."""

    m, kk = ids.shape
    own = ids == rows[:, None]
    drop = torch.where(own.any(dim=1), own.to(torch.int8).argmax(dim=1), kk - 1)
    j = torch.arange(kk - 1, device=ids.device).expand(m, kk - 1)
    keep = j + (j >= drop[:, None]).to(j.dtype)
    return d2.gather(1, keep)[:, :k], ids.gather(1, keep)[:, :k]


def knn_torch(
    x: Any, k: int, *, fast: bool | None = None, elements: int | None = None
) -> tuple[Any, Any]:
    """Exact kNN of a (n, d) torch tensor on its device: self excluded, ties by index.

    ``1 <= k <= n - 1`` (validated by the caller). ``fast``: first candidate pass in float32
    (default: on a CPU when float32 matmuls run at full precision). Returns ``(idx (n, k) int64,
    dist (n, k) float64)`` on ``x``'s device. ``elements``: block budget (default :func:`budget`).
    """

    x = x.to(torch.float64)
    n = x.shape[0]
    xc = x - x.mean(dim=0)
    # float32 products are ~10x faster on a CPU; on a GPU (or when someone lowered the float32
    # matmul precision, which would void the rounding bound) the Gram matrix is float64
    if fast is None:
        fast = x.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
    out_i = torch.empty((n, k), dtype=torch.int64, device=x.device)
    out_d2 = torch.empty((n, k), dtype=torch.float64, device=x.device)
    rows = torch.arange(n, device=x.device)
    tiers = [(torch.float32 if fast else torch.float64, k + 1 + EXTRA)]
    tiers += [(torch.float64, 4 * (k + 1 + EXTRA)), (torch.float64, n)]
    for dtype, kk in tiers:
        rows = _search(x, xc.to(dtype), rows, k, min(kk, n), out_i, out_d2, elements)
        if not rows.numel():
            break
    return out_i, out_d2.sqrt()


def _candidates(xc, sq, q, kk: int, tile: int):
    """The ``kk`` smallest Gram scores ``|x|^2 - 2 q.x`` of each query row over all points,
    merged tile by tile (running top-kk); returns (scores, ids)."""

    n = xc.shape[0]
    best_v = best_i = None
    for c0 in range(0, n, tile):
        c1 = min(n, c0 + tile)
        part = torch.addmm(sq[None, c0:c1], q, xc[c0:c1].T, beta=1.0, alpha=-2.0)
        v, i = torch.topk(part, min(kk, c1 - c0), dim=1, largest=False, sorted=False)
        i = i + c0
        if best_v is not None and best_i is not None:
            v, i = torch.cat((best_v, v), dim=1), torch.cat((best_i, i), dim=1)
            if v.shape[1] > kk:
                v, o = torch.topk(v, kk, dim=1, largest=False, sorted=False)
                i = i.gather(1, o)
        best_v, best_i = v, i
    return best_v, best_i


def _search(x, xc, rows, k, kk, out_i, out_d2, elements: int | None = None):
    """Search ``rows`` with ``kk`` Gram candidates each; write every row, return the rows whose
    certificate fails (to be redone by the next tier)."""

    n, d = x.shape
    sq = (xc * xc).sum(dim=1)
    radius = float(sq.max().sqrt())  # once per tier
    # |Gram - exact| <= (2d + 6) eps (|q| + R)^2 for centred data; 4x margin
    tol = 8 * (d + 8) * torch.finfo(xc.dtype).eps
    chunk, tile = block_shape(n, kk, d, elements or budget(x.device))
    every = torch.arange(n, device=x.device)
    failed = []
    for a in range(0, rows.numel(), chunk):
        r = rows[a : a + chunk]
        if kk < n:
            vals, cand = _candidates(xc, sq, xc[r], kk, tile)
            cut = (vals.max(dim=1).values + sq[r]).to(torch.float64)
        else:
            cand = every.expand(r.numel(), n)
            cut = torch.full((r.numel(),), float("inf"), dtype=torch.float64, device=x.device)
        diff = x[cand] - x[r, None, :]
        d2, ids = _row_sort((diff * diff).sum(dim=2), cand)
        d2, ids = _drop_self(d2, ids, r, k)
        bound = cut - tol * (sq[r].to(torch.float64).sqrt() + radius) ** 2
        out_i[r], out_d2[r] = ids, d2  # failed rows are overwritten by the next tier
        failed.append(d2[:, k - 1] >= bound)
    return rows[torch.cat(failed)]  # one host sync per tier
