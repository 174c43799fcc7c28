"""Activation store: one Zarr v3 group per (attack, norm), written while the attack runs.

Layout (see docs/design.md, "Zarr store layout")::

    <run>/<attack>-<norm>.zarr/   attrs: advlens version, store format, run config, identity, status
      samples/{index,label,pred_clean,pred_perturbed,success,norm}   (N,)
      layers/<name>/{clean,perturbed}   (N, D)  chunks of >= 1 MB rows, one shard per write batch
                                        (none for an alias: attrs["aliases"] maps it to the
                                        layer whose arrays it reads, e.g. block1 -> block1.layer.3)
      progress/batches   (B,) bool      one chunk per batch, set after all the batch's rows
      progress/batches/manifest/<b>.json  size and CRC-32 of each of batch b's files

Every batch writes whole, disjoint shards from a single writer thread, so no two writes ever
touch one shard; a killed run leaves at most one unflagged batch, which a resumed writer deletes
and writes again. Chunks carry a CRC32C checksum so that damage is detected, not read as data.
A shard file that is empty, cut short or missing would read back as fill-value zeros, so each
batch's manifest (written, with fsync, just before its progress flag) records every file's size
and checksum: sizes are checked before any read, checksums by :meth:`ActivationStore.check`,
and a resumed run writes again every batch whose files do not match (:meth:`repair`).

The package by job: ``layout`` (identity, geometry, creation, the resume check), ``integrity``
(progress flags, manifests, check and repair), ``reading``, ``writing`` (the writer thread),
and ``_zarr``, the one module that knows Zarr's files, codecs and config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from advlens.errors import StoreError
from advlens.store import layout
from advlens.store.layout import (
    IDENTITY_KEYS,
    MANIFEST,
    MIN_CHUNK_BYTES,
    RESERVED,
    SAMPLE_FIELDS,
    STORE_FORMAT,
    WHICH,
    chunk_rows,
)
from advlens.store.reading import StoreReader
from advlens.store.writing import StoreWriter

__all__ = [
    "IDENTITY_KEYS", "MANIFEST", "MIN_CHUNK_BYTES", "RESERVED", "SAMPLE_FIELDS",
    "STORE_FORMAT", "WHICH", "ActivationStore", "StoreWriter", "chunk_rows",
]  # fmt: skip


class ActivationStore(StoreReader):
    """Clean and perturbed activations of N samples at several layers, plus outcomes.

    Build with :meth:`create` (new or resumed) or :meth:`open`; write with :meth:`writer`.
    """

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        n: int,
        layers: dict[str, int],
        batch_size: int,
        dtype: str,
        attrs: dict,
        overwrite: bool = False,
        aliases: Mapping[str, str] | None = None,
    ) -> ActivationStore:
        """Create a store sized for ``n`` samples, or reopen one with the same settings.

        ``aliases`` maps a layer to an earlier one that is the same tensor
        (:func:`advlens.models.taps.catalog`): it gets no arrays of its own and reads the
        other's.

        An existing store is reopened for resume when its config and identity attrs, ``n``,
        ``batch_size``, ``dtype`` and layers match, and its damaged batches unflagged
        (:meth:`repair`); otherwise :class:`StoreError` lists what differs. ``overwrite=True``
        deletes it first.
        """
        path = Path(path)
        attrs, checked, new = layout.prepare(
            path, n=n, layers=layers, batch_size=batch_size, dtype=dtype, attrs=attrs,
            overwrite=overwrite, aliases=aliases,
        )  # fmt: skip
        store = cls(path, mode="r+")
        if not new:
            store.check_resume(
                n=n, layers=layers, batch_size=batch_size, dtype=dtype, attrs=attrs,
                aliases=checked,
            )  # fmt: skip
            store.repair()
        return store

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r") -> ActivationStore:
        """Open an existing store (``mode`` "r" or "r+")."""
        return cls(path, mode=mode)

    def writer(self, max_queue: int = 4) -> StoreWriter:
        """Context manager taking batches through a bounded queue to one writer thread."""
        if self.mode == "r":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write")
        return StoreWriter(self, max_queue=max_queue)

    def __repr__(self) -> str:
        done = int(self.completed_batches().sum())
        return (
            f"ActivationStore({str(self.path)!r}, n={self.n}, layers={len(self.layers)}, "
            f"dtype={self.dtype}, batches {done}/{self.n_batches})"
        )
