"""Reduce: PCA of a layer's joint (2N x D) activation matrix to ``n_components`` dimensions.

Two paths (docs/design.md, "Reduce"):

- :func:`reduce_store` streams the layer from the activation store in row blocks sized by a
  memory budget and never holds (2N x D): an exact covariance pass when D <= ``exact_max_d``
  (4,096), else randomized subspace iteration (:data:`POWER_ITERATIONS` passes that apply
  A^T A, then one that projects). Blocks go to the GPU one at a time when there is one; the
  algorithm is the same on either device. Layer tasks use this path.
- :func:`reduce` takes an in-memory array (API users, benchmarks on small data): scikit-learn's
  PCA on the CPU, ``torch.pca_lowrank`` on a GPU. It is the oracle the streamed path is
  tested against.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA

from advlens._env import resolve_device
from advlens.config import memory_bytes
from advlens.store import ActivationStore

log = logging.getLogger(__name__)

# Below this width the D x D covariance is small enough to accumulate exactly.
EXACT_COV_MAX_D = 4096
# Randomized branch: extra basis columns, and passes that apply A^T A (one more pass
# projects). Chosen in docs/design.md, "Reduce", from measured principal angles.
OVERSAMPLE = 20
POWER_ITERATIONS = 2
# Values per inner chunk (64 MB as float32): the unit of every sum, so that the result does
# not depend on how the memory budget cuts the layer into blocks.
CHUNK_VALUES = 1 << 24
MAX_CHUNK_ROWS = 2048

Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]


def reduce(x: np.ndarray, n_components: int = 50, *, seed: int = 0,
           device: str = "auto") -> np.ndarray:  # fmt: skip
    """Project rows of an in-memory ``x`` onto their top principal components.

    Parameters
    ----------
    x : ndarray, shape (n, d)
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


# ----------------------------------------------------------------------------- streamed PCA
@dataclass(frozen=True)
class StreamedPCA:
    """What :func:`pca_blocks` found.

    ``scores`` (n, q) float32 are the centred rows projected on ``components`` (d, q); each
    component's largest-magnitude score is positive. ``explained_variance`` (q,) is per
    component, as scikit-learn's ``explained_variance_``. ``method`` is ``exact``,
    ``randomized`` or ``centred`` (d <= n_components: the raw coordinates, centred).
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    method: str
    passes: int


def reduce_store(store: ActivationStore, layer: str, n_components: int = 50, *, seed: int = 0,
                 device: str = "auto", budget: int | None = None,
                 exact_max_d: int = EXACT_COV_MAX_D) -> StreamedPCA:  # fmt: skip
    """Streamed PCA of ``layer``'s joint matrix, read from an activation store in row blocks.

    Half of ``budget`` (bytes; None: ``embed.memory_budget = "auto"``) bounds one block; the next block is read while the
    current one is reduced, so the blocks take at most ``budget``. The working set beside
    them is a few (d x (n_components + OVERSAMPLE)) matrices and two inner chunks
    (:data:`CHUNK_VALUES`). The result does not depend on ``budget``, bit for bit.
    """
    if budget is None:
        budget = memory_bytes("auto")
    # Blocks in the store's dtype (float16: half the bytes); torch widens each inner chunk.
    rows = store.block_rows(layer, max(1, budget // 2), dtype=store.dtype)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        return _prefetch(store.joint_rows(layer, rows, dtype=store.dtype))

    return pca_blocks(blocks, 2 * store.n, store.widths[layer], n_components, seed=seed,
                      device=device, exact_max_d=exact_max_d)  # fmt: skip


def pca_blocks(blocks: Blocks, n: int, d: int, n_components: int, *, seed: int = 0,
               device: str = "auto", exact_max_d: int = EXACT_COV_MAX_D) -> StreamedPCA:  # fmt: skip
    """PCA of an (n x d) matrix given as row blocks, never holding it whole.

    Parameters
    ----------
    blocks : callable
        Called once per pass; returns ``(row0, block)`` pairs covering rows 0..n in order
        (blocks of any sizes; float16 and float32 stay as they are until each inner chunk).
    n, d : int
        Shape of the matrix.
    n_components : int
        Target dimension; ``min(n_components, d, n)`` is used.
    seed : int
        Seed of the randomized branch's Gaussian test matrix.
    device : str
        ``auto``, ``cpu`` or a CUDA device; blocks are copied there one at a time.
    exact_max_d : int
        Widths up to this use the exact covariance (two passes), wider ones the randomized
        subspace iteration (``POWER_ITERATIONS + 1`` passes).
    """
    dev = torch.device(resolve_device(device))
    q = min(n_components, d, n)
    crows = max(1, min(MAX_CHUNK_ROWS, CHUNK_VALUES // d))
    run = _Passes(blocks, n, crows, dev)
    if d <= n_components:
        return _centred(run, n, d)
    if d <= exact_max_d:
        return _exact(run, n, d, q)
    return _randomized(run, n, d, q, seed)


class _Passes:
    """Run passes over the matrix: each yields fixed inner chunks (``crows`` rows from row 0,
    whatever the blocks are), as float32 tensors on the device."""

    def __init__(self, blocks: Blocks, n: int, crows: int, dev: torch.device) -> None:
        self.blocks, self.n, self.crows, self.dev = blocks, n, crows, dev
        self.count = 0

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]]:
        self.count += 1
        pending: list[torch.Tensor] = []  # the start of the next chunk, from earlier blocks
        have = 0  # rows in pending
        row = 0  # first row of the next chunk
        seen = 0
        for row0, block in self.blocks():
            if row0 != seen:
                raise ValueError(f"block at row {row0}, expected row {seen}")
            seen += len(block)
            block = np.asarray(block)
            if block.dtype not in (np.float16, np.float32):
                block = block.astype(np.float32)
            t = torch.from_numpy(block).to(self.dev)  # one block on the device at a time
            while len(t):
                take = t[: self.crows - have]
                t = t[len(take) :]
                if not pending and len(take) == self.crows:
                    chunk = take
                else:
                    pending.append(take)
                    have += len(take)
                    if have < self.crows:
                        # A copy: a view would keep the whole block alive.
                        pending[-1] = take.clone()
                        continue
                    chunk, pending, have = torch.cat(pending), [], 0
                # float32 in fresh memory: sums never depend on where a block began
                yield row, chunk.to(torch.float32, copy=True)
                row += self.crows
        if seen != self.n:
            raise ValueError(f"the blocks hold {seen} rows, expected {self.n}")
        if pending:
            yield row, torch.cat(pending).to(torch.float32, copy=True)


def _centred(run: _Passes, n: int, d: int) -> StreamedPCA:
    total = torch.zeros(d, dtype=torch.float64, device=run.dev)
    for _, c in run():
        total += c.sum(0, dtype=torch.float64)
    mean = (total / n).float()
    out = np.empty((n, d), dtype=np.float32)
    for r0, c in run():
        out[r0 : r0 + len(c)] = (c - mean).cpu().numpy()
    var = out.var(axis=0, ddof=1) if n > 1 else np.zeros(d)
    return StreamedPCA(out, np.eye(d, dtype=np.float32), var, "centred", run.count)


def _exact(run: _Passes, n: int, d: int, q: int) -> StreamedPCA:
    # One pass: float64 sums of rows shifted by the first chunk's mean (which removes the
    # bulk of the mean, so the centring identity below loses nothing), then the projection.
    f64 = torch.float64
    cov = torch.zeros((d, d), dtype=f64, device=run.dev)
    total = torch.zeros(d, dtype=f64, device=run.dev)
    shift: torch.Tensor | None = None
    for _, c in run():
        if shift is None:
            shift = c.mean(0, dtype=f64)
        c64 = c.to(f64) - shift
        total += c64.sum(0)
        cov.addmm_(c64.T, c64)
    assert shift is not None  # n >= 1: at least one chunk
    m = total / n
    cov -= n * torch.outer(m, m)
    cov /= max(n - 1, 1)
    vals, vecs = torch.linalg.eigh(cov)
    comps = vecs[:, -q:].flip(1)
    var = vals[-q:].flip(0).clamp_min(0)
    mean = shift + m
    out = np.empty((n, q), dtype=np.float32)
    for r0, c in run():
        out[r0 : r0 + len(c)] = ((c.to(f64) - mean) @ comps).float().cpu().numpy()
    return _signed(out, comps.float().cpu().numpy(), var.cpu().numpy(), "exact", run.count)


def _randomized(run: _Passes, n: int, d: int, q: int, seed: int) -> StreamedPCA:
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4) on the
    centred matrix A, with a Rayleigh-Ritz step on the feature side.

    Each of the first POWER_ITERATIONS passes applies A^T A to a (d x l) basis in one sweep
    (A^T A M = sum over chunks of A_c^T (A_c M)) and orthonormalises it. Pass 1 also finds the
    mean: its rows are shifted by the first chunk's mean and the rest of the mean comes out
    afterwards (A^T A = A'^T A' - n m m^T, A' = A + 1 m^T). The last pass projects,
    Y = A Q; the SVD of the small Y = U S W^T gives the scores U S and components Q W.
    """
    f64 = torch.float64
    dev = run.dev
    lcols = min(q + OVERSAMPLE, d, n)
    omega = np.random.default_rng(seed).standard_normal((d, lcols), dtype=np.float32)
    basis = torch.from_numpy(omega).to(dev)
    shift: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    for it in range(POWER_ITERATIONS):
        z = torch.zeros((d, lcols), dtype=torch.float32, device=dev)
        total = torch.zeros(d, dtype=f64, device=dev)
        for _, c in run():
            if shift is None:
                shift = c.mean(0, dtype=f64).float()
            centre = shift if it == 0 else mean
            assert centre is not None  # set by the first chunk of pass 0
            a = c - centre
            if it == 0:
                total += a.sum(0, dtype=f64)
            z.addmm_(a.T, a @ basis)
        zc = z.to(f64)
        if it == 0:
            assert shift is not None  # n >= 1: at least one chunk
            m = total / n
            zc -= n * torch.outer(m, m @ basis.to(f64))
            mean = (shift.to(f64) + m).float()
        basis = torch.linalg.qr(zc).Q.float()
    assert mean is not None
    y = np.empty((n, lcols), dtype=np.float32)
    for r0, c in run():
        y[r0 : r0 + len(c)] = ((c - mean) @ basis).cpu().numpy()
    u, s, wt = np.linalg.svd(y.astype(np.float64), full_matrices=False)
    scores = u[:, :q] * s[:q]
    comps = basis.to(f64).cpu().numpy() @ wt[:q].T
    var = s[:q] ** 2 / max(n - 1, 1)
    return _signed(scores.astype(np.float32), comps.astype(np.float32), var, "randomized",
                   run.count)  # fmt: skip


def _signed(scores, comps, var, method: str, passes: int) -> StreamedPCA:
    signs = _signs(scores)  # as _fix_signs, and the GPU path of reduce()
    return StreamedPCA((scores * signs).astype(np.float32, copy=False),
                       (comps * signs).astype(np.float32, copy=False),
                       np.asarray(var, dtype=np.float64), method, passes)  # fmt: skip


def _prefetch(blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    """Read the next block on a thread while the caller works on this one (two blocks alive
    at most: the decoding of the store overlaps the matrix products)."""
    slots = threading.Semaphore(2)
    out: queue.Queue = queue.Queue()
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            it = iter(blocks)
            while not stop.is_set():
                slots.acquire()
                item = next(it, done)
                out.put(item)
                if item is done:
                    return
        except BaseException as exc:  # handed to the caller
            out.put(exc)

    thread = threading.Thread(target=work, name="advlens-reduce-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
        thread.join()


def _signs(y: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(y), axis=0)
    signs = np.sign(y[idx, np.arange(y.shape[1])])
    signs[signs == 0] = 1
    return signs


def _fix_signs(y: np.ndarray) -> np.ndarray:
    """Make each component's largest-magnitude entry positive, as scikit-learn's svd_flip does."""
    return (y * _signs(y)).astype(np.float32, copy=False)
