"""Writing: one thread takes whole batches from a bounded queue, writes their shards, records
each batch's manifest (file sizes and CRC-32, flushed to disk) and only then sets its progress
flag (docs/design.md, "Zarr store layout" and "Integrity")."""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advlens._io import fsync_dir, write_json
from advlens.errors import StoreError
from advlens.store import _zarr
from advlens.store.integrity import StoreIntegrity, manifest_path
from advlens.store.layout import OVERWRITE_HINT, SAMPLE_FIELDS, WHICH

_STOP = object()


class StoreWriter:
    """Write batches from a bounded queue on one thread; use as a context manager.

    ``put`` blocks while ``max_queue`` batches wait, so a slow disk slows the producer instead
    of filling memory. A batch's progress flag is set only after all its arrays are written.
    An error in the writer thread is raised in the producer by the next ``put`` or on exit.
    """

    def __init__(self, store: StoreIntegrity, max_queue: int = 4) -> None:
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[int] = set()
        self.written = 0

    def __enter__(self) -> StoreWriter:
        group = _zarr.open_group(self.store.path, "r+")
        self._arrays = {name: _zarr.writable(group, name) for name in self.store.array_names()}
        self._progress = _zarr.writable(group, "progress/batches")
        self._done = self._discard_partial()
        # Daemon: an interrupted exit must not hang on it; a write cut short is redone on resume.
        self._thread = threading.Thread(target=self._run, name="advlens-store-writer", daemon=True)
        self._thread.start()
        return self

    def _discard_partial(self) -> np.ndarray:
        """Delete what a killed run left of unflagged batches, so each is written from scratch.

        Zarr reads an existing shard before rewriting it; a torn or damaged one would fail.
        """
        done = self.store.completed_batches()
        for b in np.flatnonzero(~done):
            for name, arr in self._arrays.items():
                key = self.store.path / _zarr.chunk_key(name, int(b), arr.ndim)
                try:
                    if key.is_file():
                        key.unlink()
                    for tmp in _zarr.partial_files(key):
                        tmp.unlink(missing_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot clear batch {b} of array {name}: {exc}") from exc
            manifest_path(self.store.path, int(b)).unlink(missing_ok=True)
        return done

    def put(
        self,
        batch: int,
        samples: Mapping[str, np.ndarray],
        acts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Queue one batch: ``samples`` fields (b,) and per layer (clean (b, D), perturbed (b, D)).

        Arrays are kept by reference until written: do not modify them after ``put``.
        """
        self._raise_if_failed()
        if self._thread is None:
            raise RuntimeError("use the writer as a context manager: with store.writer() as w")
        store = self.store
        batch = int(batch)
        r0, r1 = store.batch_rows(batch)
        if batch in self._seen or self._done[batch]:
            raise ValueError(f"batch {batch} was already put or is already stored")
        rows = r1 - r0
        if set(samples) != set(SAMPLE_FIELDS):
            raise ValueError(
                f"samples must have keys {sorted(SAMPLE_FIELDS)}, got {sorted(samples)}"
            )
        # An alias's activations are those of its layer: they may be passed or left out.
        if not set(store.stored_layers) <= set(acts) <= set(store.layers):
            raise StoreError(
                f"batch {batch} has layers {sorted(acts)} but {store.path} stores "
                f"{store.stored_layers}: pass exactly the store's layers"
            )
        item: dict[str, np.ndarray] = {}
        for field, ftype in SAMPLE_FIELDS.items():
            value = np.asarray(samples[field], dtype=ftype)
            if value.shape != (rows,):
                raise ValueError(f"samples[{field!r}] has shape {value.shape}, expected ({rows},)")
            item[f"samples/{field}"] = value
        for layer in store.stored_layers:
            pair = acts[layer]
            for which, value in zip(WHICH, pair, strict=True):
                value = np.ascontiguousarray(value, dtype=store.dtype)
                width = store.widths[layer]
                if value.ndim != 2 or value.shape[1] != width:
                    raise StoreError(
                        f"array layers/{layer}/{which} in {store.path} holds {width} values per "
                        f"sample but batch {batch} gives shape {value.shape}: the model's layer "
                        f"changed since the store was written; {OVERWRITE_HINT}"
                    )
                if value.shape[0] != rows:
                    raise ValueError(f"{layer}/{which}: {value.shape[0]} rows, expected {rows}")
                item[f"layers/{layer}/{which}"] = value
        self._seen.add(batch)
        while True:
            try:
                self._queue.put((batch, item), timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def _run(self) -> None:
        while True:
            got = self._queue.get()
            if got is _STOP:
                return
            if self._abort.is_set():
                continue  # the producer failed: drop queued batches, they are redone on resume
            batch, item = got
            try:
                r0, r1 = self.store.batch_rows(batch)
                for name, value in item.items():
                    self._arrays[name][r0:r1] = value
                self._write_manifest(batch)
                self._progress[batch] = True  # only now is the batch complete
                _fsync_file(self.store.path / _zarr.chunk_key("progress/batches", batch, 1))
                self.written += 1
            except BaseException as exc:
                self._error = exc
                self._abort.set()

    def _write_manifest(self, batch: int) -> None:
        """Flush the batch's files to disk and record their sizes and checksums."""
        files: dict[str, Any] = {}
        for name, path in self.store.batch_files(batch).items():
            data = _fsync_file(path)
            files[name] = {"size": len(data), "crc32": zlib.crc32(data)}
        write_json(manifest_path(self.store.path, batch), {"batch": batch, "files": files})

    def _raise_if_failed(self) -> None:
        exc = self._error
        if exc is None:
            return
        if isinstance(exc, OSError):
            raise StoreError(f"writing to {self.store.path} failed: {exc}") from exc
        raise exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort.set()
        assert self._thread is not None
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()
        if self._error is None and self.store.is_complete():
            _zarr.set_attrs(self.store.path, {"status": "complete"})
            self.store.attrs["status"] = "complete"


def _fsync_file(path: Path) -> bytes:
    """Read ``path``, flush it and its folder entry to disk; return its bytes."""
    with open(path, "rb") as fh:
        data = fh.read()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return data
