"""Everything the store knows about Zarr: codecs, chunk-key paths, LocalStore's temporary
files, array creation and the write config. The rest of the store names arrays by path
(``layers/<name>/clean``) and files through :func:`chunk_key`, so a Zarr change (a new
release's file names or config keys) is met here alone (docs/design.md, "Zarr store layout").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

CLEVEL = 1
METADATA = "zarr.json"  # a group's or array's metadata file
Mode = Literal["r", "r+", "a", "w", "w-"]  # zarr.open_group's modes


def codecs() -> list[Any]:
    """Compression then a CRC32C per chunk, so damage is detected, not read as data."""
    # Byte shuffle groups the float16 exponent bytes. On ReLU activations zstd level 1 packs
    # almost as tight as level 3 (3.06x vs 3.18x) at twice the speed (benchmarks/store_throughput).
    return [BloscCodec(cname="zstd", clevel=CLEVEL, shuffle="shuffle"), Crc32cCodec()]


def chunk_key(name: str, batch: int, ndim: int) -> str:
    """The file (relative to the store) holding row block ``batch`` of array ``name``."""
    # Chunk key encoding is fixed at creation ("default", "/"): c/<row block>[/0].
    return f"{name}/c/{batch}" + "/0" * (ndim - 1)


def partial_files(key: Path) -> Iterator[Path]:
    """The temporary files LocalStore leaves beside chunk file ``key`` when a write is cut."""
    if key.parent.is_dir():
        yield from key.parent.glob(f"{key.name}.*.partial")


def is_store_dir(path: Path) -> bool:
    return (path / METADATA).is_file()


def metadata_mtime(path: Path) -> int:
    """When the group's metadata was last written (ns): a stamp for cache keys."""
    return (path / METADATA).stat().st_mtime_ns


def open_group(path: Path, mode: Mode = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode)


def read_attrs(path: Path) -> dict[str, Any]:
    """The root group's attributes (Zarr's own error when it is not a readable group)."""
    return dict(open_group(path, "r").attrs)


def set_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    open_group(path, "r+").update_attributes(dict(attrs))


def create_group(path: Path, attrs: Mapping[str, Any]) -> zarr.Group:
    """A new root group (refusing an existing one)."""
    return zarr.open_group(str(path), mode="w-", attributes=dict(attrs))


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    dims: tuple[str, ...],
    fill_value: Any,
    shards: tuple[int, ...] | None = None,
) -> Any:
    # write_empty_chunks: every written batch leaves a file, even one of fill values, so a
    # missing file is damage
    return group.create_array(
        name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, dimension_names=dims,
        fill_value=fill_value, compressors=codecs(),
        chunk_key_encoding={"name": "default", "separator": "/"},
        config={"write_empty_chunks": True},
    )  # fmt: skip


def writable(group: zarr.Group, name: str) -> Any:
    """Array ``name`` of ``group``, set to write every chunk (as :func:`create_array`)."""
    array: Any = group[name]
    return array.with_config({"write_empty_chunks": True})


def open_array(path: str | Path, name: str, mode: Mode = "r") -> Any:
    return zarr.open_group(str(path), mode=mode)[name]
