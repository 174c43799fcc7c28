"""The store's layout and identity: what arrays a store holds and how big, its attrs, the
checks that decide whether a rerun may resume it, and opening one (docs/design.md, "Zarr store
layout")."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from advlens._io import json_default
from advlens._version import __version__
from advlens.config import STORE_DTYPES
from advlens.errors import StoreError, closest
from advlens.store import _zarr

STORE_FORMAT = 2  # 2: per-batch manifest of file sizes and checksums
MANIFEST = "progress/batches/manifest"  # inside an array folder: Zarr never lists it
MIN_CHUNK_BYTES = 1 << 20
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
OVERWRITE_HINT = "pass --overwrite (overwrite=True) to delete it and start again"
RECOMPUTE_HINT = "rerun `advlens run` with the same settings: it writes the damaged batch again"


def chunk_rows(batch_size: int, row_bytes: int, min_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Rows per chunk: the smallest divisor of ``batch_size`` holding ``min_bytes``, else all."""
    for rows in range(1, batch_size + 1):
        if batch_size % rows == 0 and rows * row_bytes >= min_bytes:
            return rows
    return batch_size


class StoreLayout:
    """An opened store's identity and geometry: attrs, N, batches, layers, aliases, widths."""

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r") -> None:
        self.path = Path(path)
        self.mode = mode
        attrs = root_attrs(self.path)
        if attrs.get("store_format") != STORE_FORMAT:
            raise StoreError(
                f"{self.path} was written with store format {attrs.get('store_format')!r} "
                f"(advlens {attrs.get('advlens_version', '?')}); this advlens reads format "
                f"{STORE_FORMAT}: rerun with the advlens that wrote it, or {OVERWRITE_HINT}"
            )
        if attrs.get("status") == "creating":
            raise StoreError(f"{self.path} was never finished being created; {OVERWRITE_HINT}")
        self._group = _zarr.open_group(self.path, mode)
        self._cache: dict[str, Any] = {}
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
                        f"expected {self.n}; the store is damaged: {OVERWRITE_HINT}"
                    )
        for alias, target in self.aliases.items():
            self.widths[alias] = self.widths[target]
        for name in SAMPLE_FIELDS:
            self._node(f"samples/{name}")
        self._node("progress/batches")

    def batch_rows(self, batch: int) -> tuple[int, int]:
        """Row range ``[r0, r1)`` of ``batch``."""
        if not 0 <= batch < self.n_batches:
            raise IndexError(f"batch {batch} outside 0..{self.n_batches - 1}")
        return batch * self.batch_size, min(self.n, (batch + 1) * self.batch_size)

    def array_names(self) -> list[str]:
        """Every array with rows of each batch: the sample fields, then the stored layers."""
        names = [f"samples/{f}" for f in SAMPLE_FIELDS]
        return names + [f"layers/{layer}/{w}" for layer in self.stored_layers for w in WHICH]

    def check_resume(
        self,
        *,
        n: int,
        layers: Mapping[str, int],
        batch_size: int,
        dtype: str,
        attrs: Mapping[str, Any],
        aliases: dict[str, str],
    ) -> None:
        """Refuse to resume with settings that differ from the store's, listing each."""
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
                f"resume it, or {OVERWRITE_HINT}"
            )
        for layer, width in layers.items():
            if self.widths[layer] != width:
                raise StoreError(
                    f"array layers/{layer}/clean in {self.path} holds {self.widths[layer]} "
                    f"values per sample but the model's layer {layer!r} gives {width}: the "
                    f"model changed since the store was written; {OVERWRITE_HINT}"
                )

    def _node(self, name: str) -> Any:
        if name in self._cache:
            return self._cache[name]
        try:
            node = self._group[name]
        except KeyError:
            raise StoreError(
                f"array {name} is missing from {self.path}; the store is damaged: {OVERWRITE_HINT}"
            ) from None
        except Exception as exc:  # unreadable metadata (zarr.json)
            raise StoreError(
                f"array {name} in {self.path} has unreadable metadata ({type(exc).__name__}: "
                f"{exc}); the store is damaged: {OVERWRITE_HINT}"
            ) from exc
        self._cache[name] = node
        return node

    def _read(self, name: str, rows: slice) -> np.ndarray:
        try:
            return self._node(name)[rows]
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"array {name} in {self.path} cannot be read at rows "
                f"{rows.start or 0}:{self.n if rows.stop is None else rows.stop} "
                f"({type(exc).__name__}: {exc}); the store is damaged: {RECOMPUTE_HINT}"
            ) from exc

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


def prepare(
    path: Path,
    *,
    n: int,
    layers: dict[str, int],
    batch_size: int,
    dtype: str,
    attrs: Mapping[str, Any],
    overwrite: bool,
    aliases: Mapping[str, str] | None,
) -> tuple[dict[str, Any], dict[str, str], bool]:
    """Check the settings and create the store unless one is there to resume.

    Returns the store's caller attrs and aliases as stored, and whether the store is new.
    """
    if n < 1 or batch_size < 1:
        raise StoreError(f"store {path}: n = {n} and batch_size = {batch_size} must be >= 1")
    if dtype not in STORE_DTYPES:
        raise StoreError(f"store {path}: dtype {dtype!r}: use float16 or float32")
    for layer in layers:
        if not layer or "/" in layer or layer.startswith("__"):
            raise StoreError(f"layer name {layer!r} cannot name a Zarr array (no '/')")
    checked = _check_aliases(path, layers, aliases)
    clash = sorted(set(attrs) & set(RESERVED) - {"advlens_version"})
    if clash:
        raise StoreError(f"store attrs {clash} are reserved by the store; rename them")
    own = _jsonable({k: v for k, v in attrs.items() if k != "advlens_version"})
    if path.exists():
        if not overwrite and _existing_status(path) != "creating":  # "creating": no data yet
            return own, checked, False
        _remove_store(path)
    _create(path, n=n, layers=layers, batch_size=batch_size, dtype=dtype, attrs=own,
            aliases=checked)  # fmt: skip
    return own, checked, True


def root_attrs(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StoreError(f"no activation store at {path}; run `advlens run` to create it")
    try:
        attrs = _zarr.read_attrs(path)
    except Exception as exc:
        raise StoreError(
            f"{path} is not a readable Zarr v3 store ({type(exc).__name__}: {exc}); "
            f"{OVERWRITE_HINT}"
        ) from None
    if "store_format" not in attrs:
        raise StoreError(f"{path} is a Zarr group but not an advlens activation store")
    return attrs


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
        return json.loads(json.dumps(dict(attrs), default=json_default))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"store attrs must be JSON-serialisable: {exc}") from None


def _existing_status(path: Path) -> str | None:
    try:
        return root_attrs(path).get("status")
    except StoreError:
        return None


def _remove_store(path: Path) -> None:
    """Delete a store, refusing anything that does not look like a Zarr store."""
    if path.is_dir() and (_zarr.is_store_dir(path) or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise StoreError(f"{path} exists and is not a Zarr store; refusing to delete it: move it away")


def _check_aliases(
    path: Path, layers: Mapping[str, int], aliases: Mapping[str, str] | None
) -> dict[str, str]:
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
    group = _zarr.create_group(path, {**attrs, **own})
    for field, ftype in SAMPLE_FIELDS.items():
        _zarr.create_array(
            group, f"samples/{field}", shape=(n,), chunks=(batch_size,), dtype=ftype,
            dims=("sample",), fill_value=0,
        )  # fmt: skip
    # One tiny chunk per batch flag: setting one flag never rewrites another's.
    _zarr.create_array(
        group, "progress/batches", shape=(-(-n // batch_size),), chunks=(1,), dtype="bool",
        dims=("batch",), fill_value=False,
    )  # fmt: skip
    itemsize = np.dtype(dtype).itemsize
    for layer, width in layers.items():
        if layer in aliases:
            continue
        rows = chunk_rows(batch_size, width * itemsize)
        for which in WHICH:
            _zarr.create_array(
                group, f"layers/{layer}/{which}", shape=(n, width), chunks=(rows, width),
                shards=(batch_size, width), dtype=dtype, dims=("sample", "feature"),
                fill_value=0,
            )  # fmt: skip
    group.update_attributes({"status": "writing"})
