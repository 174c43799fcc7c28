"""Integrity: the progress flags, and every stored batch's files checked against its manifest
(sizes before any read, CRC-32 checksums on request), and repair by unflagging a damaged batch
so that the writer writes it again (docs/design.md, "Integrity (store format 2)")."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from advlens.errors import StoreError
from advlens.store import _zarr
from advlens.store.layout import MANIFEST, RECOMPUTE_HINT, StoreLayout

log = logging.getLogger("advlens.store")


def manifest_path(store_path: Path, batch: int) -> Path:
    """Where batch ``batch``'s manifest lives: ``{"batch": b, "files": {array: {size, crc32}}}``."""
    return store_path / MANIFEST / f"{batch}.json"


class StoreIntegrity(StoreLayout):
    """Progress flags and the manifest checks of an opened store."""

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r") -> None:
        super().__init__(path, mode)
        self._manifests: dict[int, dict[str, Any]] = {}

    def completed_batches(self) -> np.ndarray:
        """Bool array (n_batches,): True where every row of the batch is stored.

        A damaged flag counts as not stored: that batch is written again.
        """
        try:
            return np.asarray(self._read("progress/batches", slice(None)), dtype=bool)
        except StoreError:
            out: np.ndarray = np.zeros(self.n_batches, dtype=bool)
            for b in range(self.n_batches):
                try:
                    out[b] = bool(self._read("progress/batches", slice(b, b + 1))[0])
                except StoreError:
                    log.warning("%s: the progress flag of batch %d is damaged", self.path, b)
            return out

    def is_complete(self) -> bool:
        return bool(self.completed_batches().all())

    def batch_files(self, batch: int) -> dict[str, Path]:
        """The file of every array that holds rows of ``batch`` (one shard or chunk each)."""
        return {n: self.path / _zarr.chunk_key(n, batch, 1 if n.startswith("samples/") else 2)
                for n in self.array_names()}  # fmt: skip

    def check(self, *, checksums: bool = True) -> list[str]:
        """Problems of the stored batches, one line each naming the file; [] when intact.

        Every completed batch's files are compared with its manifest: presence and size
        (cheap), and with ``checksums`` their CRC-32 (one read of the store).
        """
        done = self.completed_batches()
        self._manifests.clear()  # read the manifests as they are now
        problems = []
        for b in np.flatnonzero(done).tolist():
            problems += [f"batch {b}: {p}" for p in self._batch_problems(b, checksums, None)]
        return problems

    def repair(self) -> list[int]:
        """Unflag every completed batch whose files do not match its manifest, so that the
        writer writes it again; returns those batches. A warning names each damaged file."""
        if self.mode == "r":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to repair")
        bad = []
        self._manifests.clear()
        for b in np.flatnonzero(self.completed_batches()).tolist():
            problems = self._batch_problems(b, True, None)
            if problems:
                log.warning(
                    "%s: batch %d (rows %d:%d) is damaged (%s); writing it again",
                    self.path, b, *self.batch_rows(b), "; ".join(problems[:3]),
                )  # fmt: skip
                bad.append(b)
        if bad:
            progress = _zarr.open_array(self.path, "progress/batches", "r+")
            for b in bad:
                progress[b] = False
                manifest_path(self.path, b).unlink(missing_ok=True)
            _zarr.set_attrs(self.path, {"status": "writing"})
            self.attrs["status"] = "writing"
            self._manifests.clear()
        return bad

    def _manifest(self, batch: int) -> dict[str, Any] | None:
        if batch not in self._manifests:
            try:
                files = json.loads(manifest_path(self.path, batch).read_text())["files"]
                assert isinstance(files, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                return None
            self._manifests[batch] = files
        return self._manifests[batch]

    def _batch_problems(self, batch: int, checksums: bool, names: list[str] | None) -> list[str]:
        manifest = self._manifest(batch)
        if manifest is None:
            return [f"its manifest {MANIFEST}/{batch}.json is missing or unreadable"]
        out = []
        for name, path in self.batch_files(batch).items():
            if names is not None and name not in names:
                continue
            want = manifest.get(name)
            rel = path.relative_to(self.path)
            if not isinstance(want, dict) or "size" not in want or "crc32" not in want:
                out.append(f"{rel} is not in its manifest")
            elif not path.is_file():
                out.append(f"{rel} is missing")
            elif path.stat().st_size != want["size"]:
                out.append(f"{rel} has {path.stat().st_size} bytes, {want['size']} were written")
            elif checksums and zlib.crc32(path.read_bytes()) != want["crc32"]:
                out.append(f"{rel} does not match its checksum")
        return out

    def _check_chunks(self, name: str) -> None:
        """Refuse an incomplete store, and any file of ``name`` that is missing or whose size
        differs from its manifest (a cut-short shard would otherwise read as zeros)."""
        done = self.completed_batches()
        if not done.all():
            raise StoreError(
                f"{self.path} is incomplete ({int(done.sum())} of {self.n_batches} batches "
                "written): rerun `advlens run` with the same settings to finish it"
            )
        for b in range(self.n_batches):
            problems = self._batch_problems(b, False, [name])
            if problems:
                r0, r1 = self.batch_rows(b)
                raise StoreError(
                    f"array {name} in {self.path} is damaged at rows {r0}:{r1} (batch {b}): "
                    f"{problems[0]}; {RECOMPUTE_HINT}"
                )
