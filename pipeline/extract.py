"""Attack and extract, batch by batch, into an :class:`~advlens.store.ActivationStore`.

For every batch not yet in the store: attack it (seed ``seed * 1_000_003 + batch``, so a
resumed run reproduces an uninterrupted one bit for bit), tap the selected layers on the clean
and the perturbed images, cast to the store dtype and hand the batch to the store's writer
thread. Host memory holds only the batches in flight, however large N is.

Memory within a batch (docs/design.md, "Extraction memory"): with a budget
(``attack.memory_mb``), :func:`plan_sub_batch` picks how many images one forward/backward pass
takes (the attack and the tap passes run in such sub-batches), and :func:`plan_queue` how many
finished batches may wait for the writer, so that neither grows with ``attack.batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from advlens.attacks import AttackResult, check_finite, chunks
from advlens.data import Dataset
from advlens.errors import StoreError
from advlens.models.taps import activation_values, tap_forward
from advlens.progress import bar, expected_forwards, forward_ticks

SEED_STRIDE = 1_000_003
# Autograd keeps about every leaf module's output per sample for the backward pass; measured
# on WRN-28-10 (CPU): 22.7 MiB per image against 18.7 MiB of leaf outputs, hence 1.5 for margin.
GRAD_FACTOR = 1.5
# Vectorised conv/GEMM kernels then see whole blocks of rows (fewer last-bit changes).
SUB_BATCH_ALIGN = 8


class BatchWriter(Protocol):
    """Takes a finished batch: ``samples`` fields (b,), per layer (clean, perturbed) (b, D)."""

    def put(
        self,
        batch: int,
        samples: Mapping[str, np.ndarray],
        acts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ) -> None: ...


class BatchStore(Protocol):
    """What :func:`extract` needs of the store it fills (an :class:`advlens.store.ActivationStore`).

    A protocol, not the class: the store is a later stage, which extract does not import.
    """

    @property
    def path(self) -> Path: ...
    @property
    def layers(self) -> Sequence[str]: ...
    @property
    def stored_layers(self) -> Sequence[str]: ...
    @property
    def aliases(self) -> Mapping[str, str]: ...
    @property
    def n(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def n_batches(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def completed_batches(self) -> np.ndarray: ...
    def batch_rows(self, batch: int) -> tuple[int, int]: ...
    def writer(self, max_queue: int = 4) -> AbstractContextManager[BatchWriter]: ...


def plan_sub_batch(
    model: torch.nn.Module, in_shape: Sequence[int], batch_size: int, memory_mb: int
) -> int | None:
    """Images per forward/backward pass so that the attack's working memory fits half of
    ``memory_mb``; None when a whole batch fits (or ``memory_mb`` is 0: no budget).

    The estimate is :data:`GRAD_FACTOR` x the float32 values that one forward pass produces
    per image (:func:`advlens.models.taps.activation_values`); it depends on the model and the
    input shape only, never on the machine, so the same config gives the same sub-batches.
    Sub-batches of 8 or more are rounded down to a multiple of 8.
    """

    if not memory_mb:
        return None
    per_image = GRAD_FACTOR * 4 * activation_values(model, in_shape)
    sub = max(1, int(memory_mb * 2**20 / 2 // per_image))
    if sub >= batch_size:
        return None
    return sub - sub % SUB_BATCH_ALIGN if sub >= SUB_BATCH_ALIGN else sub


def plan_queue(batch_bytes: int, memory_mb: int, default: int = 4) -> int:
    """Finished batches that may wait for the writer: at most ``default``, and within half of
    ``memory_mb`` (at least 1; ``default`` without a budget)."""
    if not memory_mb:
        return default
    return int(min(default, max(1, memory_mb * 2**20 / 2 // max(batch_bytes, 1))))


def batch_seed(seed: int, batch: int) -> int:
    """The attack seed of ``batch``: independent of which batches ran before it."""
    return int(seed) * SEED_STRIDE + int(batch)


def extract(
    model: torch.nn.Module,
    dataset: Dataset,
    attack: Callable[..., AttackResult],
    store: BatchStore,
    layers: Sequence[str],
    *,
    device: torch.device | str,
    pool: str = "none",
    progress: bool = True,
    seed: int | None = None,
    max_queue: int = 4,
    sub_batch: int | None = None,
) -> None:
    """Fill ``store`` with the clean and perturbed activations of ``dataset`` at ``layers``.

    Parameters
    ----------
    model : torch.nn.Module in eval mode, on ``device``.
    dataset : advlens.data.Dataset with exactly ``store.n`` samples (the ones to attack).
    attack : callable ``attack(model, x, y, *, seed) -> AttackResult``.
    store : ActivationStore opened for writing; batches already completed are skipped.
    layers : layer names in tap order; must equal ``store.layers``.
    seed : base attack seed; default ``attack.seed`` (0 when it has none).
    max_queue : batches that may wait for the writer thread.
    sub_batch : images per tap pass (None: the whole batch); the attack has its own
        ``sub_batch``.
    """

    layers = list(layers)
    if layers != store.layers:
        raise StoreError(
            f"extract: layers {layers} differ from the layers of {store.path} ({store.layers})"
        )
    if len(dataset.labels) != store.n:
        raise StoreError(
            f"extract: the dataset has {len(dataset.labels)} samples but {store.path} is sized "
            f"for {store.n}"
        )
    base = int(getattr(attack, "seed", 0) if seed is None else seed)
    todo = np.flatnonzero(~store.completed_batches())
    if todo.size == 0:
        return
    cast = getattr(torch, store.dtype)
    expected = expected_forwards(attack)  # the bar moves per attack iteration within a batch
    if expected:  # one forward per sub-batch and iteration
        expected *= len(chunks(store.batch_size, getattr(attack, "sub_batch", None)))
    rows_left = sum(r1 - r0 for r0, r1 in map(store.batch_rows, todo.tolist()))
    done = store.n_batches - todo.size
    desc = f"attack+extract {store.path.stem}" + (
        f" (resumed, {done}/{store.n_batches} batches stored)" if done else ""
    )
    with bar(rows_left, desc, unit="img", enabled=None if progress else False) as pb:
        with store.writer(max_queue=max_queue) as writer:
            for batch in todo.tolist():
                r0, r1 = store.batch_rows(batch)
                x = torch.from_numpy(np.ascontiguousarray(dataset.images[r0:r1])).to(device)
                y = torch.from_numpy(np.ascontiguousarray(dataset.labels[r0:r1])).to(device)
                with forward_ticks(model, pb, r1 - r0, expected) as ticks:
                    res = attack(model, x, y, seed=batch_seed(base, batch))
                clean = _tap_host(model, x, layers, pool, sub_batch, cast, store,
                                  f"clean activations of batch {batch}")  # fmt: skip
                adv = _tap_host(model, res.x_adv, layers, pool, sub_batch, cast, store,
                                f"perturbed activations of batch {batch}")  # fmt: skip
                acts = {name: (clean[name], adv[name]) for name in store.stored_layers}
                samples: dict[str, Any] = {
                    "index": dataset.index[r0:r1],
                    "label": dataset.labels[r0:r1],
                    "pred_clean": _host(res.pred_clean),
                    "pred_perturbed": _host(res.pred_adv),
                    "success": _host(res.success),
                    "norm": _host(res.norm),
                }
                writer.put(batch, samples, acts)
                pb.update(ticks.left)


def _tap_host(model, x, layers, pool, sub_batch, cast, store, what: str):
    """``{layer: (B, D) array in the store dtype}`` for the layers the store keeps (not its
    aliases, which are checked to be the same tensor), ``sub_batch`` images at a time."""

    out: dict[str, np.ndarray] = {}
    for rows in chunks(len(x), sub_batch):
        with torch.no_grad():
            _, acts = tap_forward(model, x[rows], layers, pool=pool, aliases=store.aliases)
        for name in store.stored_layers:  # before the cast: float16 would turn overflow into inf
            check_finite(acts[name], f"layer {name!r}: {what}", dtype=store.dtype)
            host = _host(acts.pop(name), cast)
            if rows.start == 0 and rows.stop == len(x):
                out[name] = host
                continue
            if name not in out:
                out[name] = np.empty((len(x), *host.shape[1:]), host.dtype)
            out[name][rows] = host
    return out


def _host(t, dtype=None) -> np.ndarray:
    # Cast on the device first: float16 halves the bytes that cross to the host.
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.cpu().numpy()
