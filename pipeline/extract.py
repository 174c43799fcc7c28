"""Attack and extract, batch by batch, into an :class:`~advlens.store.ActivationStore`.

For every batch not yet in the store: attack it (seed ``seed * 1_000_003 + batch``, so a
resumed run reproduces an uninterrupted one bit for bit), tap the selected layers on the clean
and the perturbed images, cast to the store dtype and hand the batch to the store's writer
thread. Host memory holds only the batches in flight, however large N is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from advlens.attacks import check_finite
from advlens.errors import StoreError
from advlens.models.taps import tap_forward
from advlens.progress import bar, expected_forwards, forward_ticks

SEED_STRIDE = 1_000_003


def batch_seed(seed: int, batch: int) -> int:
    """The attack seed of ``batch``: independent of which batches ran before it."""
    return int(seed) * SEED_STRIDE + int(batch)


def extract(
    model,
    dataset,
    attack,
    store,
    layers: Sequence[str],
    *,
    device,
    pool: str = "none",
    progress: bool = True,
    seed: int | None = None,
    max_queue: int = 4,
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
    rows_left = sum(r1 - r0 for r0, r1 in map(store.batch_rows, todo))
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
                with torch.no_grad():
                    _, clean = tap_forward(model, x, layers, pool=pool)
                    _, adv = tap_forward(model, res.x_adv, layers, pool=pool)
                for name in layers:  # before the cast: float16 would turn overflow into inf
                    for which, acts_ in (("clean", clean), ("perturbed", adv)):
                        check_finite(
                            acts_[name],
                            f"layer {name!r}: {which} activations of batch {batch}",
                            dtype=store.dtype,
                        )
                acts = {name: (_host(clean[name], cast), _host(adv[name], cast)) for name in layers}
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


def _host(t, dtype=None) -> np.ndarray:
    # Cast on the device first: float16 halves the bytes that cross to the host.
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.cpu().numpy()
