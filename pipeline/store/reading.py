"""Reading a complete store: whole layers, shard by shard, the joint clean-then-perturbed
matrix whole or in row blocks (the streamed PCA's source), and the per-sample outcomes. Every
read first checks that the store is complete and that the files it reads match their
manifest."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from advlens.store.integrity import StoreIntegrity
from advlens.store.layout import SAMPLE_FIELDS, WHICH, chunk_rows


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

    def block_rows(self, layer: str, budget_bytes: int, dtype: str = "float32") -> int:
        """Rows per :meth:`joint_rows` block that fit ``budget_bytes`` as ``dtype``, aligned to
        the store's shards (whole write batches) or, below one shard, to its chunks; at least
        one chunk."""
        self._check_layer(layer)
        width = self.widths[layer]
        rows = max(1, int(budget_bytes) // (np.dtype(dtype).itemsize * width))
        if rows >= self.batch_size:
            return rows - rows % self.batch_size
        chunk = chunk_rows(self.batch_size, width * np.dtype(self.dtype).itemsize)
        return max(chunk, rows - rows % chunk)

    def joint_rows(self, layer: str, rows: int,
                   dtype: str = "float32") -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
        """Yield ``(row0, block)`` of the (2N, D) joint matrix (clean rows then perturbed
        rows, twin of i is i + N) in blocks of at most ``rows`` rows as ``dtype`` (float32, or
        the store's own dtype), never straddling the clean/perturbed boundary; memory: one
        block (:meth:`block_rows` sizes it)."""
        if rows < 1:
            raise ValueError(f"rows = {rows}: a block holds at least one row")
        self._check_layer(layer)
        width = self.widths[layer]
        # Fill the block one store chunk at a time: no second copy in the store's dtype.
        step = chunk_rows(self.batch_size, width * np.dtype(self.dtype).itemsize)
        for k, which in enumerate(WHICH):
            name = self._layer_array(layer, which)
            self._check_chunks(name)
            for r0 in range(0, self.n, rows):
                r1 = min(self.n, r0 + rows)
                block = np.empty((r1 - r0, width), dtype=dtype)
                a = r0
                while a < r1:
                    b = min(r1, a - a % step + step)  # up to the next chunk boundary
                    block[a - r0 : b - r0] = self._read(name, slice(a, b))
                    a = b
                yield k * self.n + r0, block

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
