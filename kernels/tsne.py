"""t-SNE on a torch device: exact kNN, perplexity calibration, sparse P, gradient, optimiser.

Everything runs in float32 on ``x.device`` (CPU for tests, CUDA for speed):

- :func:`knn_graph`: the affinity graph's neighbours, chosen by size (:func:`choose_knn`):
  :func:`exact_knn` (``advlens.kernels.bruteforce``: blocked Gram scores with a running top-k,
  over-fetched candidates re-ranked in float64 and certified, so "exact" is exact) up to
  ``EXACT_KNN_MAX_N`` points, the IVF search of ``advlens.kernels.ivf`` (recall >= 0.99) above.
- :func:`conditional_p`: per-point precision by vectorised bisection to the target perplexity
  (openTSNE's schedule: double/halve until bracketed, then bisect; tolerance on the entropy).
- :func:`joint_p`: P = (P + P^T) / 2 normalised to sum 1, as CSR index arrays.
- :func:`attraction`, :func:`repulsion_exact` (tiled), ``tsne_fft.repulsion_fft`` (FIt-SNE) and
  :func:`gradient`, in openTSNE's units (the KL gradient divided by 4).
- :func:`optimize`: momentum, gains (openTSNE's rule), step-norm clipping, re-centring.

Determinism: sums over edges and boxes use ``torch.segment_reduce`` over sorted keys (no float
atomics), reductions are torch's fixed-order ones, so a seeded run repeats bit for bit on one
device. The optimisation loop does not synchronise with the host: the FFT grid size is read
from an extent copied asynchronously ``REGRID_EVERY`` iterations earlier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from advlens.kernels.bruteforce import knn_torch
from advlens.kernels.ivf import ivf_knn
from advlens.kernels.tsne_fft import BOXES_PER_UNIT, n_boxes_for, repulsion_fft

EXACT_MAX_N = 2048  # repulsion "auto": exact (tiled) up to here, FFT interpolation above
REGRID_EVERY = 10  # FFT grid size refreshed every this many iterations
GRID_MARGIN = 1.1  # boxes for 10% more than the (growth-extrapolated) extent
INIT_STD = 1e-4  # openTSNE: initial maps have std 1e-4


def _budget(device: torch.device, *, gpu: int = 1 << 26, cpu: int = 1 << 22) -> int:
    """Elements per temporary block (default 256 MB of float32 on a GPU, 16 MB on the CPU)."""
    return gpu if device.type == "cuda" else cpu


# ----------------------------------------------------------------------------- affinities


# exact kNN up to here (O(n^2 d) work: ~0.1 s at 2.5e5 points on an H100-class GPU in
# float64, ~20 s at 1e5 on two CPU cores), IVF above
EXACT_KNN_MAX_N = {"cuda": 250_000, "cpu": 50_000}
KNN_METHODS = ("auto", "exact", "ivf")


def choose_knn(n: int, device: torch.device | str, method: str = "auto") -> str:
    """``auto``: exact up to ``EXACT_KNN_MAX_N[device type]`` points, IVF above."""
    if method not in KNN_METHODS:
        raise ValueError(f"knn method {method!r}: use {', '.join(KNN_METHODS)}")
    if method != "auto":
        return method
    kind = torch.device(device).type
    return "exact" if n <= EXACT_KNN_MAX_N.get(kind, EXACT_KNN_MAX_N["cpu"]) else "ivf"


def exact_knn(
    x: torch.Tensor, k: int, *, block_elems: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each row of ``x`` (itself excluded), nearest first.

    Returns ``idx`` (n, k) int64 and Euclidean ``dist`` (n, k) float32 (from float64).
    """

    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"exact_knn: k = {k} needs 1 <= k < n = {n}")
    idx, dist = knn_torch(x, k, elements=block_elems)
    return idx, dist.to(torch.float32)


def knn_graph(
    x: torch.Tensor, k: int, method: str = "auto", *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(idx, dist float32, method that ran) of the k nearest neighbours, chosen by size."""
    method = choose_knn(x.shape[0], x.device, method)
    if method == "exact":
        return (*exact_knn(x, k), method)

    if not 1 <= k < x.shape[0]:
        raise ValueError(f"knn_graph: k = {k} needs 1 <= k < n = {x.shape[0]}")
    idx, dist = ivf_knn(x, k, seed=seed)
    return idx, dist.to(torch.float32), method


def conditional_p(
    dist: torch.Tensor, perplexity: float, *, tol: float = 1e-5, max_iter: int = 200
) -> torch.Tensor:
    """Row-normalised Gaussian affinities p_{j|i} (n, k) with entropy log(perplexity).

    Vectorised over all points: each precision tau_i is doubled or halved until the entropy is
    bracketed, then bisected (openTSNE's scheme), until |H - log(perplexity)| <= tol.
    """
    d2 = dist.to(torch.float32) ** 2
    d2 = d2 - d2.min(dim=1, keepdim=True).values  # shift: same P, no underflow in float32
    n = d2.shape[0]
    target = math.log(perplexity)
    tau = torch.ones(n, dtype=torch.float32, device=d2.device)
    lo = torch.zeros_like(tau)  # 0: no lower bracket yet (tau > 0 always)
    hi = torch.full_like(tau, math.inf)

    def entropy(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.exp(-0.5 * t[:, None] * d2)
        s = p.sum(dim=1)
        h = torch.log(s) + 0.5 * t * (p * d2).sum(dim=1) / s
        return h - target, p / s[:, None]

    for it in range(max_iter):
        diff, _ = entropy(tau)
        done = diff.abs() <= tol
        if it % 20 == 19 and bool(done.all()):  # a sync every 20 steps, outside the t-SNE loop
            break
        up = diff > 0  # entropy too high: sharpen (raise tau)
        lo = torch.where(up & ~done, tau, lo)
        hi = torch.where(~up & ~done, tau, hi)
        nxt = torch.where(
            up,
            torch.where(torch.isinf(hi), tau * 2, (tau + hi) / 2),
            torch.where(lo == 0, tau / 2, (tau + lo) / 2),
        )
        tau = torch.where(done, tau, nxt.clamp(1e-30, 1e30))
    return entropy(tau)[1]


@dataclass(frozen=True)
class Affinities:
    """Symmetric P (sums to 1) as CSR: ``crow`` (n+1,), per edge ``row``, ``col``, ``val``."""

    crow: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    perplexity: float
    k: int

    def __post_init__(self) -> None:
        e = self.val.shape[0]
        if self.row.shape != (e,) or self.col.shape != (e,) or self.crow.ndim != 1:
            raise ValueError("Affinities: row, col, val must be (E,) and crow (n+1,)")

    @property
    def n(self) -> int:
        return self.crow.shape[0] - 1

    def dense(self) -> torch.Tensor:
        """P as a dense (n, n) tensor (tests and small n only)."""
        out = torch.zeros((self.n, self.n), dtype=self.val.dtype, device=self.val.device)
        out[self.row.long(), self.col.long()] = self.val
        return out


def joint_p(idx: torch.Tensor, p_cond: torch.Tensor, perplexity: float = math.nan) -> Affinities:
    """Symmetrise conditional affinities: P = (P + P^T) / 2, normalised to sum 1 (openTSNE)."""
    n, k = idx.shape
    dev = idx.device
    src = torch.arange(n, device=dev, dtype=torch.int64).repeat_interleave(k)
    dst = idx.reshape(-1).to(torch.int64)
    keys = torch.cat((src * n + dst, dst * n + src))
    vals = torch.cat((p_cond.reshape(-1), p_cond.reshape(-1))).to(torch.float32)
    keys, order = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)  # one sync: setup only
    offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))
    val = torch.segment_reduce(vals[order], "sum", offsets=offsets, axis=0, unsafe=True)
    val = val / val.sum()
    row, col = uniq // n, uniq % n
    crow = torch.searchsorted(row, torch.arange(n + 1, device=dev, dtype=torch.int64))
    small = torch.int32 if n < 2**31 else torch.int64  # halves index traffic in the loop
    return Affinities(crow, row.to(small), col.to(small), val, float(perplexity), k)


def affinities(
    x: torch.Tensor,
    perplexity: float,
    *,
    knn: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Affinities:
    """kNN (k = min(n-1, 3 * perplexity), or the given graph) -> calibrated symmetric P.

    As openTSNE, a perplexity above k is lowered to k / 3.
    """
    if knn is None:
        knn = knn_graph(x, n_neighbors(x.shape[0], perplexity))[:2]
    return calibrate(*knn, perplexity)


def n_neighbors(n: int, perplexity: float) -> int:
    """k = min(n - 1, 3 * perplexity), openTSNE's choice."""
    return min(n - 1, int(3 * perplexity))


def calibrate(idx: torch.Tensor, dist: torch.Tensor, perplexity: float) -> Affinities:
    """P from a kNN graph; a perplexity above its k is lowered to k / 3 (openTSNE)."""
    k = idx.shape[1]
    eff = perplexity if perplexity <= k else k / 3.0
    return joint_p(idx, conditional_p(dist, eff), eff)


# ----------------------------------------------------------------------------- init


def pca_init(x: torch.Tensor, seed: int = 0, init: str = "pca") -> torch.Tensor:
    """Starting map (n, 2) float32: openTSNE's PCA recipe or N(0, 1e-4^2) noise.

    PCA: top-2 principal axes (sign: largest-|.| loading positive, scikit-learn's svd_flip),
    scaled so PC1 has std 1e-4, plus N(0, 1e-6^2) jitter. The noise comes from NumPy's
    ``RandomState(seed)`` in the same order as ``advlens.embed._common.initial_positions``,
    so every engine and device starts from the same map.
    """
    n = x.shape[0]
    rng = np.random.RandomState(seed)
    if init == "random":
        noise = INIT_STD * rng.standard_normal((n, 2))
        return torch.as_tensor(noise, dtype=torch.float32).to(x.device)
    xc = x.to(torch.float32) - x.to(torch.float32).mean(dim=0)
    if xc.shape[1] <= 4096:
        cov = (xc.T @ xc).double()
        vecs = torch.linalg.eigh(cov).eigenvectors[:, -2:].flip(1)  # descending variance
    else:  # wide input: randomised range finder with a seeded sketch, then exact on it
        sketch_rng = np.random.RandomState(seed + 1)  # keeps `rng` for the jitter, as _common
        sketch = torch.as_tensor(sketch_rng.standard_normal((xc.shape[1], 12)), torch.float32)
        q = torch.linalg.qr(xc @ sketch.to(x.device)).Q
        for _ in range(3):
            q = torch.linalg.qr(xc @ (xc.T @ q)).Q
        vecs = torch.linalg.svd((q.T @ xc).double(), full_matrices=False).Vh[:2].T
    top = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[top, torch.arange(2, device=vecs.device)])
    y = (xc.double() @ (vecs * signs)).to(torch.float32)
    std = float(y[:, 0].std(correction=0))
    if not math.isfinite(std) or std == 0.0:
        return pca_init(x, seed, "random")
    y = y * (INIT_STD / std)
    jitter = rng.normal(0.0, INIT_STD * 0.01, (n, 2))
    return y + torch.as_tensor(jitter, dtype=torch.float32).to(x.device)


# ----------------------------------------------------------------------------- gradient


def _edge_forces(y, row, col, val):
    """Per edge ``p_ij w_ij (y_i - y_j)`` (E, 2): two gathers and the arithmetic."""
    diff = y.index_select(0, row) - y.index_select(0, col)
    w = val / (1.0 + (diff * diff).sum(dim=1))
    return diff * w[:, None]


_FUSED: dict[str, Callable[..., torch.Tensor]] = {}


def fused_edge_forces() -> Callable[..., torch.Tensor]:
    """:func:`_edge_forces` compiled by ``torch.compile`` into one kernel (gathers, distance,
    weight and product in one pass over the edges instead of ~9; a Triton kernel on a GPU, a C++
    loop on the CPU), built once per process. The sum per point stays a ``segment_reduce``."""
    if "edges" not in _FUSED:
        _FUSED["edges"] = torch.compile(_edge_forces, dynamic=False)
    return _FUSED["edges"]


def attraction(y: torch.Tensor, P: Affinities, *, fused: bool = False) -> torch.Tensor:
    """``sum_j p_ij w_ij (y_i - y_j)`` over the sparse edges (n, 2); ``fused``: one kernel."""
    edges = fused_edge_forces() if fused else _edge_forces
    forces = edges(y, P.row, P.col, P.val)
    return torch.segment_reduce(forces, "sum", offsets=P.crow, axis=0, unsafe=True)


def repulsion_exact(
    y: torch.Tensor, *, block_elems: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``sum_j w_ij^2 (y_i - y_j)`` (n, 2) and Z = ``sum_{i != j} w_ij``, tiled by rows."""
    n = y.shape[0]
    rows = max(1, (block_elems or _budget(y.device, cpu=1 << 16)) // n)  # CPU: blocks in L2
    rep = torch.empty_like(y)
    zrow = torch.empty(n, dtype=y.dtype, device=y.device)
    x0, x1 = y[:, 0], y[:, 1]
    for s in range(0, n, rows):
        e = min(n, s + rows)
        dx = y[s:e, 0:1] - x0
        dy = y[s:e, 1:2] - x1
        w = 1.0 / (1.0 + dx * dx + dy * dy)
        zrow[s:e] = w.sum(dim=1)
        w2 = w * w
        rep[s:e, 0] = (w2 * dx).sum(dim=1)
        rep[s:e, 1] = (w2 * dy).sum(dim=1)
    return rep, zrow.sum() - n


def repulsion(
    y: torch.Tensor, method: str, n_boxes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repulsive term and Z by ``method`` ("exact" or "fft")."""
    if method == "exact":
        return repulsion_exact(y)
    return repulsion_fft(y, n_boxes)


def gradient(
    y: torch.Tensor,
    P: Affinities,
    *,
    exaggeration: float = 1.0,
    method: str = "exact",
    n_boxes: int | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL gradient / 4 (openTSNE's units) with P scaled by ``exaggeration``, and Z."""
    rep, z = repulsion(y, method, n_boxes)
    return exaggeration * attraction(y, P, fused=fused) - rep / z, z


def kl_divergence(y: torch.Tensor, P: Affinities, z: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum P log P - sum P log w + log Z (P sums to 1), as a 0-d tensor."""
    diff = y.index_select(0, P.row) - y.index_select(0, P.col)
    log_w = -torch.log1p((diff * diff).sum(dim=1))
    return torch.xlogy(P.val, P.val).sum() - (P.val * log_w).sum() + torch.log(z)


def choose_method(n: int, method: str = "auto") -> str:
    """``auto``: exact below EXACT_MAX_N points, FFT interpolation above."""
    if method == "auto":
        return "exact" if n <= EXACT_MAX_N else "fft"
    if method not in ("exact", "fft"):
        raise ValueError(f"repulsion method {method!r}: use auto, exact or fft")
    return method


# ----------------------------------------------------------------------------- optimiser


class _GridSizer:
    """FFT boxes per side without a host sync in the loop.

    Every REGRID_EVERY iterations the extent is copied to (pinned) host memory asynchronously;
    the size for the next block of iterations is taken from the previous copy, extrapolated by
    its recent growth, so that boxes stay about 1 / ``per_unit`` wide while the map expands.
    """

    def __init__(self, y: torch.Tensor, per_unit: float):
        self.per_unit = per_unit
        self.cuda = y.device.type == "cuda"
        ext = float(y.max() - y.min())  # one sync before the loop
        self.last, self.prev = ext, ext
        self.host = torch.zeros(1, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def size(self, y: torch.Tensor, it: int) -> int:
        if it % REGRID_EVERY == 0 and it > 0:
            if self.pending:
                if self.event is not None:
                    self.event.synchronize()  # long done: recorded REGRID_EVERY steps ago
                self.prev, self.last = self.last, float(self.host[0])
            extent = (y.max() - y.min()).reshape(1)
            self.host.copy_(extent, non_blocking=self.cuda)
            if self.event is not None:
                self.event.record()
            self.pending = True
        growth = min(2.0, max(1.0, self.last / self.prev if self.prev > 0 else 1.0))
        return n_boxes_for(self.last * growth * growth * GRID_MARGIN, self.per_unit)


def _step(y, grad, update, gains, momentum: float, lr: float, max_step_norm, min_gain: float):
    """One openTSNE update, in place on ``y``, ``update`` and ``gains``."""
    flipped = torch.sign(update) != torch.sign(grad)
    gains.copy_(torch.where(flipped, gains + 0.2, gains * 0.8 + min_gain))
    update.mul_(momentum).addcmul_(gains, grad, value=-lr)
    if max_step_norm is not None:
        norm = torch.linalg.vector_norm(update, dim=1, keepdim=True)
        update.mul_(torch.clamp(max_step_norm / norm, max=1.0))
    y.add_(update)
    y.sub_(y.mean(dim=0))


def optimize(
    y: torch.Tensor,
    P: Affinities,
    *,
    n_iter: int = 1000,
    early_exaggeration_iter: int = 250,
    early_exaggeration: float = 12.0,
    learning_rate: float | str = "auto",
    momentum: tuple[float, float] = (0.5, 0.8),
    max_step_norm: float | None = 5.0,
    min_gain: float = 0.01,
    method: str = "auto",
    boxes_per_unit: float = BOXES_PER_UNIT,
    kl_every: int = 0,
    compile: bool = False,
) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """Gradient descent with momentum and gains, openTSNE's update rule.

    ``n_iter`` counts all iterations; the first ``early_exaggeration_iter`` use P times
    ``early_exaggeration`` and ``momentum[0]``. ``learning_rate="auto"`` is
    n / early_exaggeration in both phases. Gains: +0.2 where the gradient sign flips against
    the last update, else * 0.8 + ``min_gain``. Updates longer than ``max_step_norm`` are
    shortened; the map is re-centred every step. ``boxes_per_unit`` sets the FFT grid.
    ``kl_every`` > 0 records the KL divergence every that many iterations (kept on the device
    until the end). ``compile`` fuses the element-wise update and the per-edge attraction
    (:func:`fused_edge_forces`) with ``torch.compile``.

    Returns the final map (a new tensor) and [(iteration, KL)], the last entry for the result.
    """
    n = y.shape[0]
    method = choose_method(n, method)
    lr = n / early_exaggeration if learning_rate == "auto" else float(learning_rate)
    step = torch.compile(_step, dynamic=False) if compile else _step
    y = y.to(torch.float32).clone()
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    sizer = _GridSizer(y, boxes_per_unit) if method == "fft" else None
    history: list[tuple[int, torch.Tensor]] = []
    for it in range(n_iter):
        early = it < early_exaggeration_iter
        n_boxes = sizer.size(y, it) if sizer is not None else None
        exaggeration = early_exaggeration if early else 1.0
        grad, z = gradient(
            y, P, exaggeration=exaggeration, method=method, n_boxes=n_boxes, fused=compile
        )
        if kl_every and it % kl_every == 0:
            history.append((it, kl_divergence(y, P, z)))
        step(y, grad, update, gains, momentum[0] if early else momentum[1], lr, max_step_norm,
             min_gain)  # fmt: skip
    final_boxes = None if sizer is None else n_boxes_for(float(y.max() - y.min()), boxes_per_unit)
    _, z = repulsion(y, method, final_boxes)
    history.append((n_iter, kl_divergence(y, P, z)))
    return y, [(i, float(v)) for i, v in history]


@dataclass(frozen=True)
class TSNEResult:
    """Map (n, 2) float32 on the device, the affinities, KL history and phase seconds."""

    y: torch.Tensor
    P: Affinities
    kl: list[tuple[int, float]]
    method: str
    seconds_knn: float
    seconds_affinities: float
    seconds_optimize: float
    knn: str = "exact"  # which neighbour search ran: exact, ivf or precomputed

    def __post_init__(self) -> None:
        if self.y.ndim != 2 or self.y.shape[1] != 2 or self.y.shape[0] != self.P.n:
            raise ValueError(f"TSNEResult: y has shape {tuple(self.y.shape)}, P has n={self.P.n}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tsne(
    x: torch.Tensor,
    *,
    perplexity: float = 30.0,
    knn: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: str | torch.Tensor = "pca",
    seed: int = 0,
    **opt: Any,
) -> TSNEResult:
    """Full t-SNE of ``x`` (n, d) on its device; ``opt`` goes to :func:`optimize`."""

    dev = x.device
    x = x.to(torch.float32)
    n = x.shape[0]
    synchronize(dev)
    t0 = time.perf_counter()
    knn_method = "precomputed"
    if knn is None:
        idx, dist, knn_method = knn_graph(x, n_neighbors(n, perplexity), seed=seed)
        knn = (idx, dist)
        synchronize(dev)
    t1 = time.perf_counter()
    P = calibrate(knn[0].to(dev), knn[1].to(dev), perplexity)
    y0 = pca_init(x, seed, init) if isinstance(init, str) else init.to(dev, torch.float32)
    synchronize(dev)
    t2 = time.perf_counter()
    y, kl = optimize(y0, P, **opt)
    synchronize(dev)
    t3 = time.perf_counter()
    method = choose_method(n, opt.get("method", "auto"))
    return TSNEResult(y, P, kl, method, t1 - t0, t2 - t1, t3 - t2, knn_method)
