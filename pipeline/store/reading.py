"""Reading a complete store: whole layers, shard by shard, lazily through Dask, the joint
clean-then-perturbed matrix, and the per-sample outcomes. Every read first checks that the store
is complete and that the files it reads match their manifest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from advlens.errors import StoreError
from advlens.store import _zarr
from advlens.store.integrity import StoreIntegrity
from advlens.store.layout import RECOMPUTE_HINT, SAMPLE_FIELDS, WHICH


class StoreReader(StoreIntegrity):
    """The readers of an opened store."""

    def read_layer(self, layer: str, which: str) -> np.ndarray:
        """The (N, D) activations of ``layer`` for ``which`` in {clean, perturbed}."""
        name = self._layer_array(layer, which)
        out = np.empty((self.n, self.widths[layer]), dtype=self.dtype)
        for r0, r1 in self._blocks(name):
            out[r0:r1] = self._read(name, slice(r0, r1))
        return out

    def iter_layer(self, layer: str, which: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row0, block)`` one shard at a time (memory: one block)."""
        name = self._layer_array(layer, which)
        for r0, r1 in self._blocks(name):
            yield r0, self._read(name, slice(r0, r1))

    def dask_layer(self, layer: str, which: str) -> da.Array:
        """The layer as a lazy ``dask.array`` with one chunk per shard (write batch)."""
        name = self._layer_array(layer, which)
        self._check_chunks(name)
        src = _BlockSource(str(self.path), name, (self.n, self.widths[layer]), self.dtype)
        stamp = _zarr.metadata_mtime(self.path)
        return da.from_array(
            src,
            chunks=(self.batch_size, self.widths[layer]),
            name=f"advlens-{layer}-{which}-{tokenize(str(self.path.resolve()), name, stamp)}",
            asarray=True,
            lock=False,
            meta=np.empty((0, 0), dtype=self.dtype),
        )

    def joint(self, layer: str) -> np.ndarray:
        """The (2N, D) float32 matrix: clean rows then perturbed rows (twin of i is i + N)."""
        self._check_layer(layer)
        out = np.empty((2 * self.n, self.widths[layer]), dtype=np.float32)
        for k, which in enumerate(WHICH):
            name = self._layer_array(layer, which)
            for r0, r1 in self._blocks(name):
                out[k * self.n + r0 : k * self.n + r1] = self._read(name, slice(r0, r1))
        return out

    def samples(self) -> dict[str, np.ndarray]:
        """Per-sample arrays: index, label, pred_clean, pred_perturbed, success, norm."""
        out = {}
        for field in SAMPLE_FIELDS:
            name = f"samples/{field}"
            self._check_chunks(name)
            out[field] = np.asarray(self._read(name, slice(None)))
        return out

    def _blocks(self, name: str) -> list[tuple[int, int]]:
        self._check_chunks(name)
        return [self.batch_rows(b) for b in range(self.n_batches)]


class _BlockSource:
    """Picklable array-like for ``dask.array.from_array``: opens the Zarr array lazily."""

    def __init__(self, path: str, name: str, shape: tuple[int, int], dtype: str) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, shape, np.dtype(dtype)
        self.ndim = 2
        self._arr: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arr": None}

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            if self._arr is None:
                self._arr = _zarr.open_array(Path(self.path), self.name)
            return self._arr[key]
        except Exception as exc:
            raise StoreError(
                f"array {self.name} in {self.path} cannot be read at {key} "
                f"({type(exc).__name__}: {exc}); the store is damaged: {RECOMPUTE_HINT}"
            ) from exc
