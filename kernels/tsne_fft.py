"""FFT-accelerated t-SNE repulsion (FIt-SNE, Linderman et al. 2019) in torch.

The embedding's bounding square is cut into ``n_boxes x n_boxes`` boxes with ``p`` Lagrange
interpolation nodes per box and axis (equispaced at the box's ``(k + 1/2) / p``). Each point
spreads its charges ``(1, y1, y2)`` onto the ``p x p`` nodes of its box; the node grid is
convolved with the kernels ``1 / (1 + r^2)^2`` (all three charges) and ``1 / (1 + r^2)`` (unit
charge, for the normaliser Z) by zero-padded 2-D FFTs; the potentials are interpolated back.
Per point i, with w_ij = 1 / (1 + |y_i - y_j|^2)::

    rep_i = sum_j w_ij^2 (y_i - y_j) = y_i * phi_0 - (phi_1, phi_2)
    Z     = sum_{i != j} w_ij        = sum_i phi_Z(i) - n

Z has its own convolution instead of openTSNE's ``(1 + |y|^2) phi_0 - 2 y.phi + phi_3``
identity: that identity cancels terms of size |y|^2 and loses digits in float32.

Determinism: points are sorted by box (stable sort) and the charges of each box summed with
``torch.segment_reduce`` (one thread per segment on CUDA, no atomics), so a run is bit for bit
repeatable on one device. No host synchronisation unless ``n_boxes`` is None.
"""

from __future__ import annotations

import math

import torch

MIN_BOXES = 50  # openTSNE / FIt-SNE min_num_intervals
MAX_BOXES = 1000  # openTSNE caps the grid at 1000 boxes per side
# Boxes per unit of map length. openTSNE/FIt-SNE use 1 (ints_in_interval = 1); on a converged
# map that leaves ~3% error in the repulsion (openTSNE's own FFT code shows the same). The error
# falls as width^3, so 2 boxes per unit bring it under 1% for 4x the grid, cheap on a GPU.
BOXES_PER_UNIT = 2.0
N_NODES = 3  # interpolation nodes per box and axis (FIt-SNE's p = 3)


def _fft_friendly(lo: int, hi: int) -> list[int]:
    """Sorted 7-smooth numbers in [lo, hi]: cuFFT and pocketfft are fastest on 2^a 3^b 5^c 7^d."""
    out = []
    for v in range(lo, hi + 1):
        r = v
        for f in (2, 3, 5, 7):
            while r % f == 0:
                r //= f
        if r == 1:
            out.append(v)
    return out


BAND_RATIO = 1.25  # consecutive grid sizes differ by at least this factor


def _bands(sizes: list[int], ratio: float = BAND_RATIO) -> list[int]:
    """A fixed ladder of grid sizes, each >= ``ratio`` x the last (MAX_BOXES closes it).

    The grid grows with the map; on the ladder a whole run meets ~15 sizes instead of ~150,
    so the FFT plans (cuFFT's plan cache in torch, pocketfft's) are built once per band and
    reused, and the shapes stay fixed for long stretches (what graph capture needs)."""
    out = [sizes[0]]
    for v in sizes[1:]:
        if v >= out[-1] * ratio:
            out.append(v)
    if out[-1] != sizes[-1]:
        out.append(sizes[-1])
    return out


_SIZES = _bands(_fft_friendly(MIN_BOXES, MAX_BOXES))


def n_boxes_for(extent: float, per_unit: float = BOXES_PER_UNIT) -> int:
    """Boxes per side for a map ``extent`` wide: >= MIN_BOXES, >= ``per_unit`` per unit of
    length, rounded up to the next size of the fixed band ladder (7-smooth, FFT-friendly), at
    most MAX_BOXES."""
    if not math.isfinite(extent):
        return MAX_BOXES
    want = max(MIN_BOXES, math.ceil(extent * per_unit))
    for size in _SIZES:
        if size >= want:
            return size
    return MAX_BOXES


def _lagrange(u: torch.Tensor, p: int) -> torch.Tensor:
    """Lagrange basis on nodes (k + 1/2) / p at local coordinates ``u`` in [0, 1]: (..., p)."""
    nodes = [(k + 0.5) / p for k in range(p)]
    out = []
    for k in range(p):
        acc = torch.ones_like(u)
        for m in range(p):
            if m != k:
                acc = acc * ((u - nodes[m]) / (nodes[k] - nodes[m]))
        out.append(acc)
    return torch.stack(out, dim=-1)


def _kernels_hat(width: torch.Tensor, m: int, p: int) -> torch.Tensor:
    """rfft2 of the circulant embeddings (2m x 2m) of (1+r^2)^-2 and (1+r^2)^-1 on the nodes."""
    steps = torch.arange(2 * m, device=width.device, dtype=width.dtype)
    steps = torch.where(steps < m, steps, steps - 2 * m)  # signed node offsets, mod 2m
    d = steps * (width / p)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    k1 = 1.0 / (1.0 + r2)
    return torch.fft.rfft2(torch.stack((k1 * k1, k1)))


def repulsion_fft(
    y: torch.Tensor, n_boxes: int | None = None, *, p: int = N_NODES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repulsive term and normaliser of the t-SNE gradient by FFT interpolation.

    Parameters
    ----------
    y : (n, 2) float32 embedding.
    n_boxes : boxes per side; None: from the current extent (:func:`n_boxes_for`, one sync).
    p : interpolation nodes per box and axis.

    Returns
    -------
    rep : (n, 2) ``sum_j w_ij^2 (y_i - y_j)``; Z : 0-d tensor ``sum_{i != j} w_ij``.
    """
    n = y.shape[0]
    lo = y.min()
    extent = y.max() - lo
    if n_boxes is None:
        n_boxes = n_boxes_for(float(extent))
    nb, m = n_boxes, n_boxes * p
    width = torch.clamp(extent, min=torch.finfo(y.dtype).tiny) / nb
    rel = (y - lo) / width  # position in box units
    box = torch.clamp(torch.floor(rel), 0, nb - 1)
    key = (box[:, 1] * nb + box[:, 0]).to(torch.int64)  # boxes row-major: (y-row, x-col)
    key, perm = torch.sort(key, stable=True)
    ys, rel, box = y[perm], rel[perm], box[perm]
    lag = _lagrange(rel - box, p)  # (n, 2, p): x-basis, y-basis
    weights = lag[:, 1, :, None] * lag[:, 0, None, :]  # (n, p_y, p_x)
    charges = torch.cat((torch.ones_like(ys[:, :1]), ys), dim=1)  # (n, 3)
    spread = (weights[..., None] * charges[:, None, None, :]).reshape(n, p * p * 3)
    bounds = torch.arange(nb * nb + 1, device=y.device, dtype=torch.int64)
    offsets = torch.searchsorted(key, bounds)
    per_box = torch.segment_reduce(spread, "sum", offsets=offsets, axis=0, unsafe=True)
    # (by, bx, b, a, c) -> (c, by, b, bx, a): node (by*p + b, bx*p + a) of the m x m grid
    grid = per_box.view(nb, nb, p, p, 3).permute(4, 0, 2, 1, 3).reshape(3, m, m)
    w_hat = torch.fft.rfft2(grid, s=(2 * m, 2 * m))
    k_hat = _kernels_hat(width, m, p)
    prod = torch.cat((w_hat * k_hat[0], w_hat[:1] * k_hat[1]), dim=0)
    phi_grid = torch.fft.irfft2(prod, s=(2 * m, 2 * m))[:, :m, :m]  # (4, m, m)
    # gather each point's p x p node potentials back
    bi = box.to(torch.int64)
    node = torch.arange(p, device=y.device, dtype=torch.int64)
    rows = bi[:, 1, None] * p + node  # (n, p)
    cols = bi[:, 0, None] * p + node
    flat = (rows[:, :, None] * m + cols[:, None, :]).reshape(-1)
    phi_nodes = phi_grid.permute(1, 2, 0).reshape(m * m, 4).index_select(0, flat)
    phi = (phi_nodes.view(n, p * p, 4) * weights.reshape(n, p * p, 1)).sum(dim=1)  # (n, 4)
    rep_sorted = ys * phi[:, :1] - phi[:, 1:3]
    z = phi[:, 3].sum() - n
    rep = torch.empty_like(y).index_copy_(0, perm, rep_sorted)
    return rep, z
