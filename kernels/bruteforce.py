"""Exact kNN of high-dimensional points by chunked brute force (torch, CPU or CUDA).

Candidates come from the Gram-matrix distances ``|q|^2 + |x|^2 - 2 q.x`` (one matrix product per
chunk, then ``topk``); their squared distances are recomputed exactly as ``sum((x_j - q)^2)`` in
float64 and sorted by (distance, index). The candidate set is certified: every other point's
Gram distance is at least the cut-off, so its exact distance is at least the cut-off minus a
rounding bound; rows where the k-th exact distance is not strictly below that (exact ties,
duplicates) are redone against all points.
"""

from __future__ import annotations

from typing import Any

EXTRA = 8  # spare candidates beyond k + 1, so that the certificate almost always holds
CHUNK_ELEMENTS = 1 << 24  # elements of the (chunk x n) Gram block and (chunk x k x d) differences


def _row_sort(d2: Any, ids: Any) -> tuple[Any, Any]:
    """Sort each row by (d2, id) with two stable sorts."""
    import torch

    o = torch.argsort(ids, dim=1, stable=True)
    d2, ids = d2.gather(1, o), ids.gather(1, o)
    o = torch.argsort(d2, dim=1, stable=True)
    return d2.gather(1, o), ids.gather(1, o)


def _drop_self(d2: Any, ids: Any, rows: Any, k: int) -> tuple[Any, Any]:
    """Remove each row's own index (or its last entry when the point itself is not listed)."""
    keep = ids != rows[:, None]
    keep[keep.all(dim=1), -1] = False
    m = ids.shape[0]
    return d2[keep].reshape(m, -1)[:, :k], ids[keep].reshape(m, -1)[:, :k]


def knn_torch(x: Any, k: int, *, fast: bool | None = None) -> tuple[Any, Any]:
    """Exact kNN of a (n, d) torch tensor on its device: self excluded, ties by index.

    ``1 <= k <= n - 1`` (validated by the caller). ``fast``: first candidate pass in float32
    (default: on a CPU when float32 matmuls run at full precision). Returns ``(idx (n, k) int64,
    dist (n, k) float64)`` on ``x``'s device.
    """
    import torch

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
        rows = _search(x, xc.to(dtype), rows, k, min(kk, n), out_i, out_d2)
        if not rows.numel():
            break
    return out_i, out_d2.sqrt()


def _search(x, xc, rows, k, kk, out_i, out_d2):
    """Search ``rows`` with ``kk`` Gram candidates each; write certified rows, return the rest."""
    import torch

    n, d = x.shape
    sq = (xc * xc).sum(dim=1)
    radius = sq.max().sqrt()
    # |Gram - exact| <= (2d + 6) eps (|q| + R)^2 for centred data; 4x margin
    tol = 8 * (d + 8) * torch.finfo(xc.dtype).eps
    chunk = max(1, min(CHUNK_ELEMENTS // n, CHUNK_ELEMENTS // (kk * d)))
    every = torch.arange(n, device=x.device)
    failed = []
    for a in range(0, rows.numel(), chunk):
        r = rows[a : a + chunk]
        if kk < n:
            # |q|^2 is constant along a row: rank by |x|^2 - 2 q.x (one fused product)
            part = torch.addmm(sq[None, :], xc[r], xc.T, beta=1.0, alpha=-2.0)
            vals, cand = torch.topk(part, kk, dim=1, largest=False, sorted=False)
            cut = (vals.max(dim=1).values + sq[r]).to(torch.float64)
        else:
            cand = every.expand(r.numel(), n)
            cut = torch.full((r.numel(),), float("inf"), dtype=torch.float64, device=x.device)
        diff = x[cand] - x[r, None, :]
        d2, ids = _row_sort((diff * diff).sum(dim=2), cand)
        d2, ids = _drop_self(d2, ids, r, k)
        bound = cut - tol * (sq[r].to(torch.float64).sqrt() + float(radius)) ** 2
        ok = d2[:, k - 1] < bound
        out_i[r[ok]], out_d2[r[ok]] = ids[ok], d2[ok]
        failed.append(r[~ok])
    return torch.cat(failed)
