"""Activation store: one Zarr v3 group per (attack, norm), written while the attack runs.

Layout (see docs/design.md)::

    <run>/<attack>-<norm>.zarr/   attrs: advlens version, store format, run config, identity, status
      samples/{index,label,pred_clean,pred_perturbed,success,norm}   (N,)
      layers/<name>/{clean,perturbed}   (N, D)  chunks of >= 1 MB rows, one shard per write batch
                                        (none for an alias: attrs["aliases"] maps it to the
                                        layer whose arrays it reads, e.g. block1 -> block1.layer.3)
      progress/batches   (B,) bool      one chunk per batch, set after all the batch's rows
      progress/batches/manifest/<b>.json  size and CRC-32 of each of batch b's files
      embeddings/<name>/<key>   (2N, 2) float32

Every batch writes whole, disjoint shards from a single writer thread, so no two writes ever
touch one shard; a killed run leaves at most one unflagged batch, which a resumed writer deletes
and writes again. Chunks carry a CRC32C checksum so that damage is detected, not read as data.
A shard file that is empty, cut short or missing would read back as fill-value zeros, so each
batch's manifest (written, with fsync, just before its progress flag) records every file's size
and checksum: sizes are checked before any read, checksums by :meth:`ActivationStore.check`,
and a resumed run writes again every batch whose files do not match (:meth:`repair`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advlens._io import fsync_dir, write_json
from advlens.errors import StoreError, closest

log = logging.getLogger(__name__)
STORE_FORMAT = 2  # 2: per-batch manifest of file sizes and checksums
MANIFEST = "progress/batches/manifest"  # inside an array folder: Zarr never lists it
MIN_CHUNK_BYTES = 1 << 20
CLEVEL = 1
WHICH = ("clean", "perturbed")
SAMPLE_FIELDS = {
    "index": "int64",
    "label": "int64",
    "pred_clean": "int64",
    "pred_perturbed": "int64",
    "success": "bool",
    "norm": "float32",
}
# Attribute keys the store owns; the caller's attrs (config, model, dataset, ...) sit beside them.
RESERVED = ("advlens_version", "store_format", "status", "n", "batch_size", "dtype", "layers",
            "aliases")  # fmt: skip
# Caller attrs that decide what the store holds: a rerun must match them to resume.
IDENTITY_KEYS = ("config", "model", "dataset", "attack")
# The caller's "config" attr holds only the settings that shape the store (advlens.config
# store_identity), so every difference in it refuses a resume.
_OVERWRITE_HINT = "pass --overwrite (overwrite=True) to delete it and start again"
_RECOMPUTE_HINT = "rerun `advlens run` with the same settings: it writes the damaged batch again"


def chunk_rows(batch_size: int, row_bytes: int, min_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Rows per chunk: the smallest divisor of ``batch_size`` holding ``min_bytes``, else all."""
    for rows in range(1, batch_size + 1):
        if batch_size % rows == 0 and rows * row_bytes >= min_bytes:
            return rows
    return batch_size


def _codecs() -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    # Byte shuffle groups the float16 exponent bytes. On ReLU activations zstd level 1 packs
    # almost as tight as level 3 (3.06x vs 3.18x) at twice the speed (benchmarks/store_throughput).
    return [BloscCodec(cname="zstd", clevel=CLEVEL, shuffle="shuffle"), Crc32cCodec()]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not d and prefix:
        out[prefix] = {}
    return out


def _jsonable(attrs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(attrs)))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store attrs must be JSON-serialisable: {exc}") from None


class ActivationStore:
    """Clean and perturbed activations of N samples at several layers, plus outcomes.

    Build with :meth:`create` (new or resumed) or :meth:`open`; write with :meth:`writer`.
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        import zarr

        self.path = Path(path)
        self.mode = mode
        attrs = _root_attrs(self.path)
        if attrs.get("store_format") != STORE_FORMAT:
            raise StoreError(
                f"{self.path} was written with store format {attrs.get('store_format')!r} "
                f"(advlens {attrs.get('advlens_version', '?')}); this advlens reads format "
                f"{STORE_FORMAT}: rerun with the advlens that wrote it, or {_OVERWRITE_HINT}"
            )
        if attrs.get("status") == "creating":
            raise StoreError(f"{self.path} was never finished being created; {_OVERWRITE_HINT}")
        self._group = zarr.open_group(str(self.path), mode=mode)
        self._cache: dict[str, Any] = {}
        self._manifests: dict[int, dict[str, Any]] = {}
        self.attrs: dict[str, Any] = attrs
        self.n = int(attrs["n"])
        self.batch_size = int(attrs["batch_size"])
        self.n_batches = -(-self.n // self.batch_size)
        self.dtype = str(attrs["dtype"])
        self.layers: list[str] = list(attrs["layers"])
        # A layer that is the same tensor as another is stored once (stores without the
        # attribute, written before aliases existed, have none).
        self.aliases: dict[str, str] = dict(attrs.get("aliases") or {})
        self.stored_layers: list[str] = [x for x in self.layers if x not in self.aliases]
        self.widths: dict[str, int] = {}
        for layer in self.stored_layers:
            for which in WHICH:
                arr = self._node(f"layers/{layer}/{which}")
                self.widths[layer] = int(arr.shape[1])
                if arr.shape[0] != self.n:
                    raise StoreError(
                        f"array layers/{layer}/{which} in {self.path} has {arr.shape[0]} rows, "
                        f"expected {self.n}; the store is damaged: {_OVERWRITE_HINT}"
                    )
        for alias, target in self.aliases.items():
            self.widths[alias] = self.widths[target]
        for name in SAMPLE_FIELDS:
            self._node(f"samples/{name}")
        self._node("progress/batches")

    # ----------------------------------------------------------------------------- construction
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
        if n < 1 or batch_size < 1:
            raise StoreError(f"store {path}: n = {n} and batch_size = {batch_size} must be >= 1")
        if dtype not in ("float16", "float32"):
            raise StoreError(f"store {path}: dtype {dtype!r}: use float16 or float32")
        for layer in layers:
            if not layer or "/" in layer or layer.startswith("__"):
                raise StoreError(f"layer name {layer!r} cannot name a Zarr array (no '/')")
        aliases = _check_aliases(path, layers, aliases)
        clash = sorted(set(attrs) & set(RESERVED) - {"advlens_version"})
        if clash:
            raise StoreError(f"store attrs {clash} are reserved by the store; rename them")
        attrs = _jsonable({k: v for k, v in attrs.items() if k != "advlens_version"})
        if path.exists():
            status = _existing_status(path)
            if overwrite or status == "creating":  # "creating": killed before any data
                _remove_store(path)
            else:
                store = cls(path, mode="r+")
                store._check_resume(
                    n=n, layers=layers, batch_size=batch_size, dtype=dtype, attrs=attrs,
                    aliases=aliases,
                )  # fmt: skip
                store.repair()
                return store
        _create(path, n=n, layers=layers, batch_size=batch_size, dtype=dtype, attrs=attrs,
                aliases=aliases)  # fmt: skip
        return cls(path, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ActivationStore:
        """Open an existing store (``mode`` "r" or "r+")."""
        return cls(path, mode=mode)

    def _check_resume(self, *, n, layers, batch_size, dtype, attrs, aliases) -> None:
        stored = {k: self.attrs.get(k) for k in IDENTITY_KEYS if k in attrs or k in self.attrs}
        new = {k: attrs.get(k) for k in stored}
        old_flat, new_flat = _flatten(stored), _flatten(new)
        diffs = [
            f"  {key.removeprefix('config.')}: {old_flat.get(key, '<absent>')!r} in the store, "
            f"{new_flat.get(key, '<absent>')!r} now"
            for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key, "<absent>") != new_flat.get(key, "<absent>")
        ]
        for what, old, now in (
            ("n (samples)", self.n, n),
            ("batch_size", self.batch_size, batch_size),
            ("dtype", self.dtype, dtype),
            ("layers", self.layers, list(layers)),
            ("aliases", self.aliases, aliases),
        ):
            if old != now:
                diffs.append(f"  {what}: {old!r} in the store, {now!r} now")
        if diffs:
            raise StoreError(
                f"{self.path} holds a run made with different settings, so it cannot be "
                "resumed:\n" + "\n".join(diffs) + "\nRerun with the store's settings to "
                f"resume it, or {_OVERWRITE_HINT}"
            )
        for layer, width in layers.items():
            if self.widths[layer] != width:
                raise StoreError(
                    f"array layers/{layer}/clean in {self.path} holds {self.widths[layer]} "
                    f"values per sample but the model's layer {layer!r} gives {width}: the "
                    f"model changed since the store was written; {_OVERWRITE_HINT}"
                )

    # ----------------------------------------------------------------------------- progress
    def batch_rows(self, batch: int) -> tuple[int, int]:
        """Row range ``[r0, r1)`` of ``batch``."""
        if not 0 <= batch < self.n_batches:
            raise IndexError(f"batch {batch} outside 0..{self.n_batches - 1}")
        return batch * self.batch_size, min(self.n, (batch + 1) * self.batch_size)

    def completed_batches(self) -> np.ndarray:
        """Bool array (n_batches,): True where every row of the batch is stored.

        A damaged flag counts as not stored: that batch is written again.
        """
        try:
            return np.asarray(self._read("progress/batches", slice(None)), dtype=bool)
        except StoreError:
            out = np.zeros(self.n_batches, dtype=bool)
            for b in range(self.n_batches):
                try:
                    out[b] = bool(self._read("progress/batches", slice(b, b + 1))[0])
                except StoreError:
                    log.warning("%s: the progress flag of batch %d is damaged", self.path, b)
            return out

    def is_complete(self) -> bool:
        return bool(self.completed_batches().all())

    # ----------------------------------------------------------------------------- integrity
    def batch_files(self, batch: int) -> dict[str, Path]:
        """The file of every array that holds rows of ``batch`` (one shard or chunk each)."""
        names = [f"samples/{f}" for f in SAMPLE_FIELDS]
        names += [f"layers/{layer}/{w}" for layer in self.stored_layers for w in WHICH]
        return {n: self.path / _chunk_key(n, batch, 1 if n.startswith("samples/") else 2)
                for n in names}  # fmt: skip

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
            import zarr

            group = zarr.open_group(str(self.path), mode="r+")
            progress = group["progress/batches"]
            for b in bad:
                progress[b] = False
                (self.path / MANIFEST / f"{b}.json").unlink(missing_ok=True)
            group.update_attributes({"status": "writing"})
            self.attrs["status"] = "writing"
            self._manifests.clear()
        return bad

    def _manifest(self, batch: int) -> dict[str, Any] | None:
        if batch not in self._manifests:
            path = self.path / MANIFEST / f"{batch}.json"
            try:
                files = json.loads(path.read_text())["files"]
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

    def writer(self, max_queue: int = 4) -> StoreWriter:
        """Context manager taking batches through a bounded queue to one writer thread."""
        if self.mode == "r":
            raise StoreError(f"{self.path} is open read-only; open it with mode='r+' to write")
        return StoreWriter(self, max_queue=max_queue)

    # ----------------------------------------------------------------------------- readers
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

    def dask_layer(self, layer: str, which: str):
        """The layer as a lazy ``dask.array`` with one chunk per shard (write batch)."""
        import dask.array as da
        from dask.base import tokenize

        name = self._layer_array(layer, which)
        self._check_chunks(name)
        src = _BlockSource(str(self.path), name, (self.n, self.widths[layer]), self.dtype)
        stamp = (self.path / "zarr.json").stat().st_mtime_ns
        return da.from_array(
            src,
            chunks=(self.batch_size, self.widths[layer]),
            name=f"advlens-{layer}-{which}-{tokenize(str(self.path.resolve()), name, stamp)}",
            asarray=True,
            lock=False,
            meta=np.empty((0, 0), dtype=self.dtype),
        )

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

    # ----------------------------------------------------------------------------- embeddings
    def write_embedding(self, layer: str, key: str, xy: np.ndarray, attrs: dict | None = None):
        """Store a (2N, 2) map as ``embeddings/<layer>/<key>`` (replacing one of that key).

        Embeddings are the one thing written to a store opened read-only: analysis tasks add
        them to a finished store.
        """
        import zarr

        self._check_layer(layer)
        xy = np.asarray(xy, dtype=np.float32)
        if xy.shape != (2 * self.n, 2):
            raise ValueError(f"embedding must have shape {(2 * self.n, 2)}, got {xy.shape}")
        if not key or "/" in key:
            raise StoreError(f"embedding key {key!r} cannot name a Zarr array (no '/')")
        group = zarr.open_group(str(self.path), mode="r+")
        arr = (
            group.require_group("embeddings")
            .require_group(layer)
            .create_array(
                key,
                shape=xy.shape,
                chunks=xy.shape,
                dtype="float32",
                compressors=_codecs(),
                dimension_names=("point", "axis"),
                fill_value=np.nan,
                overwrite=True,
                attributes=_jsonable(attrs or {}),
            )
        )
        arr[:] = xy

    def read_embedding(self, layer: str, key: str) -> np.ndarray:
        """The (2N, 2) map stored by :meth:`write_embedding`."""
        name = f"embeddings/{layer}/{key}"
        try:
            self._group[name]
        except KeyError:
            have = self.embedding_keys(layer)
            raise StoreError(
                f"{self.path} has no embedding {name!r}; "
                + (closest(key, have) if have else "none stored for this layer")
            ) from None
        return np.asarray(self._read(name, slice(None)), dtype=np.float32)

    def embedding_keys(self, layer: str) -> list[str]:
        try:
            group = self._group[f"embeddings/{layer}"]
        except KeyError:
            return []
        return sorted(name for name, _ in group.arrays())

    # ----------------------------------------------------------------------------- internals
    def _node(self, name: str):
        if name in self._cache:
            return self._cache[name]
        try:
            node = self._group[name]
        except KeyError:
            raise StoreError(
                f"array {name} is missing from {self.path}; the store is damaged: {_OVERWRITE_HINT}"
            ) from None
        except Exception as exc:  # unreadable metadata (zarr.json)
            raise StoreError(
                f"array {name} in {self.path} has unreadable metadata ({type(exc).__name__}: "
                f"{exc}); the store is damaged: {_OVERWRITE_HINT}"
            ) from exc
        if not name.startswith("embeddings/"):  # embeddings are replaced by later tasks
            self._cache[name] = node
        return node

    def _check_layer(self, layer: str) -> None:
        if layer not in self.widths:
            raise StoreError(
                f"layer {layer!r} is not in {self.path}; {closest(layer, self.layers)}"
            )

    def _layer_array(self, layer: str, which: str) -> str:
        self._check_layer(layer)
        if which not in WHICH:
            raise StoreError(f"which = {which!r}: use 'clean' or 'perturbed'")
        return f"layers/{self.aliases.get(layer, layer)}/{which}"

    def _blocks(self, name: str) -> list[tuple[int, int]]:
        self._check_chunks(name)
        return [self.batch_rows(b) for b in range(self.n_batches)]

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
                    f"{problems[0]}; {_RECOMPUTE_HINT}"
                )

    def _read(self, name: str, rows: slice) -> np.ndarray:
        try:
            return self._node(name)[rows]
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"array {name} in {self.path} cannot be read at rows "
                f"{rows.start or 0}:{self.n if rows.stop is None else rows.stop} "
                f"({type(exc).__name__}: {exc}); the store is damaged: {_RECOMPUTE_HINT}"
            ) from exc

    def __repr__(self) -> str:
        done = int(self.completed_batches().sum())
        return (
            f"ActivationStore({str(self.path)!r}, n={self.n}, layers={len(self.layers)}, "
            f"dtype={self.dtype}, batches {done}/{self.n_batches})"
        )


def _chunk_key(name: str, batch: int, ndim: int) -> str:
    # Chunk key encoding is fixed at creation ("default", "/"): c/<row block>[/0].
    return f"{name}/c/{batch}" + "/0" * (ndim - 1)


def _fsync_file(path: Path) -> bytes:
    """Read ``path``, flush it and its folder entry to disk; return its bytes."""
    with open(path, "rb") as fh:
        data = fh.read()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
    return data


def _root_attrs(path: Path) -> dict[str, Any]:
    import zarr

    if not path.exists():
        raise StoreError(f"no activation store at {path}; run `advlens run` to create it")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise StoreError(
            f"{path} is not a readable Zarr v3 store ({type(exc).__name__}: {exc}); "
            f"{_OVERWRITE_HINT}"
        ) from None
    if "store_format" not in attrs:
        raise StoreError(f"{path} is a Zarr group but not an advlens activation store")
    return attrs


def _existing_status(path: Path) -> str | None:
    try:
        return _root_attrs(path).get("status")
    except StoreError:
        return None


def _remove_store(path: Path) -> None:
    """Delete a store, refusing anything that does not look like a Zarr store."""
    if path.is_dir() and ((path / "zarr.json").is_file() or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise StoreError(f"{path} exists and is not a Zarr store; refusing to delete it: move it away")


def _check_aliases(path: Path, layers: Mapping[str, int], aliases) -> dict[str, str]:
    aliases = dict(aliases or {})
    for alias, target in aliases.items():
        if alias not in layers or target not in layers or target in aliases or alias == target:
            raise StoreError(
                f"store {path}: alias {alias!r} -> {target!r} must map a layer of the store to "
                "another layer that is stored (not itself an alias)"
            )
        if layers[alias] != layers[target]:
            raise StoreError(
                f"store {path}: alias {alias!r} ({layers[alias]} values) and {target!r} "
                f"({layers[target]} values) differ in width"
            )
    return aliases


def _create(path: Path, *, n, layers, batch_size, dtype, attrs, aliases) -> None:
    import zarr

    from advlens._version import __version__

    own = {
        "advlens_version": __version__,
        "store_format": STORE_FORMAT,
        "status": "creating",
        "n": n,
        "batch_size": batch_size,
        "dtype": dtype,
        "layers": list(layers),
        "aliases": dict(aliases),
    }
    group = zarr.open_group(str(path), mode="w-", attributes={**attrs, **own})
    common = dict(
        compressors=_codecs(),
        chunk_key_encoding={"name": "default", "separator": "/"},
        config={"write_empty_chunks": True},  # every written batch leaves a file: gaps = damage
    )
    for field, ftype in SAMPLE_FIELDS.items():
        group.create_array(
            f"samples/{field}", shape=(n,), chunks=(batch_size,), dtype=ftype,
            dimension_names=("sample",), fill_value=0, **common,
        )  # fmt: skip
    # One tiny chunk per batch flag: setting one flag never rewrites another's.
    group.create_array(
        "progress/batches", shape=(-(-n // batch_size),), chunks=(1,), dtype="bool",
        dimension_names=("batch",), fill_value=False, **common,
    )  # fmt: skip
    itemsize = np.dtype(dtype).itemsize
    for layer, width in layers.items():
        if layer in aliases:
            continue
        rows = chunk_rows(batch_size, width * itemsize)
        for which in WHICH:
            group.create_array(
                f"layers/{layer}/{which}", shape=(n, width), chunks=(rows, width),
                shards=(batch_size, width), dtype=dtype, dimension_names=("sample", "feature"),
                fill_value=0, **common,
            )  # fmt: skip
    group.update_attributes({"status": "writing"})


class _BlockSource:
    """Picklable array-like for ``dask.array.from_array``: opens the Zarr array lazily."""

    def __init__(self, path: str, name: str, shape: tuple[int, int], dtype: str) -> None:
        self.path, self.name, self.shape, self.dtype = path, name, shape, np.dtype(dtype)
        self.ndim = 2
        self._arr = None

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}

    def __getitem__(self, key):
        import zarr

        try:
            if self._arr is None:
                self._arr = zarr.open_group(self.path, mode="r")[self.name]
            return self._arr[key]
        except Exception as exc:
            raise StoreError(
                f"array {self.name} in {self.path} cannot be read at {key} "
                f"({type(exc).__name__}: {exc}); the store is damaged: {_RECOMPUTE_HINT}"
            ) from exc


_STOP = object()


class StoreWriter:
    """Write batches from a bounded queue on one thread; use as a context manager.

    ``put`` blocks while ``max_queue`` batches wait, so a slow disk slows the producer instead
    of filling memory. A batch's progress flag is set only after all its arrays are written.
    An error in the writer thread is raised in the producer by the next ``put`` or on exit.
    """

    def __init__(self, store: ActivationStore, max_queue: int = 4) -> None:
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[int] = set()
        self.written = 0

    def __enter__(self) -> StoreWriter:
        import zarr

        group = zarr.open_group(str(self.store.path), mode="r+")
        names = [f"samples/{f}" for f in SAMPLE_FIELDS]
        names += [f"layers/{layer}/{w}" for layer in self.store.stored_layers for w in WHICH]
        self._arrays = {
            name: group[name].with_config({"write_empty_chunks": True}) for name in names
        }
        self._progress = group["progress/batches"].with_config({"write_empty_chunks": True})
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
                key = self.store.path / _chunk_key(name, int(b), arr.ndim)
                try:
                    if key.is_file():
                        key.unlink()
                    if key.parent.is_dir():
                        for tmp in key.parent.glob(f"{key.name}.*.partial"):  # LocalStore temps
                            tmp.unlink(missing_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot clear batch {b} of array {name}: {exc}") from exc
            (self.store.path / MANIFEST / f"{int(b)}.json").unlink(missing_ok=True)
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
                        f"changed since the store was written; {_OVERWRITE_HINT}"
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
                _fsync_file(self.store.path / _chunk_key("progress/batches", batch, 1))
                self.written += 1
            except BaseException as exc:
                self._error = exc
                self._abort.set()

    def _write_manifest(self, batch: int) -> None:
        """Flush the batch's files to disk and record their sizes and checksums."""
        files = {}
        for name, path in self.store.batch_files(batch).items():
            data = _fsync_file(path)
            files[name] = {"size": len(data), "crc32": zlib.crc32(data)}
        write_json(self.store.path / MANIFEST / f"{batch}.json", {"batch": batch, "files": files})

    def _raise_if_failed(self) -> None:
        exc = self._error
        if exc is None:
            return
        if isinstance(exc, OSError):
            raise StoreError(f"writing to {self.store.path} failed: {exc}") from exc
        raise exc

    def __exit__(self, exc_type, exc, tb) -> None:
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
            import zarr

            zarr.open_group(str(self.store.path), mode="r+").update_attributes(
                {"status": "complete"}
            )
            self.store.attrs["status"] = "complete"
