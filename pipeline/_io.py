"""Small file helpers: atomic, durable writes (the only way advlens replaces a file), the one
JSON converter, file-name slugs, and the record of the files a run wrote.

A run folder's ``.advlens-written`` lists, one relative path a line, every file advlens wrote
there (recorded just before it is written). advlens deletes only files on that list, so a
user's file in the run folder, ``tasks/`` or ``figures/`` is never removed.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

WRITTEN = ".advlens-written"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp's 0600 becomes the mode a plain open() would give


def atomic_write(path: str | Path, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes a given path) to ``path`` atomically.

    The content goes to a temporary file in the same folder, is flushed to disk, then
    ``os.replace`` renames it and the folder is flushed: readers see either the old file or
    the whole new one, never a partial write, even after a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk, where supported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NumPy scalars and arrays converted)."""
    text = json.dumps(obj, indent=2, default=json_default, allow_nan=True)
    return atomic_write(path, (text + "\n").encode())


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Atomically write arrays as a compressed ``.npz`` file."""
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return atomic_write(path, buf.getvalue())


def record(run_dir: str | Path, *paths: str | Path) -> None:
    """Add ``paths`` (inside ``run_dir``) to the run's list of files advlens wrote.

    One appended write per call, so tasks on several workers can record at once.
    """
    run_dir = Path(run_dir)
    lines = "".join(f"{_rel(run_dir, p)}\n" for p in paths)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / WRITTEN, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def written(run_dir: str | Path) -> set[str]:
    """Relative paths of the files advlens recorded writing in ``run_dir``."""
    path = Path(run_dir) / WRITTEN
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    return {line for line in text.splitlines() if line and ".." not in Path(line).parts}


def remove_written(run_dir: str | Path, paths: Iterable[str | Path]) -> tuple[list[str], list[str]]:
    """Delete those of ``paths`` that advlens wrote; return (removed, left) relative paths."""
    run_dir = Path(run_dir)
    ours = written(run_dir)
    removed, left = [], []
    for p in paths:
        rel = _rel(run_dir, p)
        if rel in ours:
            (run_dir / rel).unlink(missing_ok=True)
            removed.append(rel)
        elif (run_dir / rel).exists():
            left.append(rel)
    if removed:
        keep = sorted(ours - set(removed))
        atomic_write(run_dir / WRITTEN, "".join(f"{r}\n" for r in keep).encode())
    return removed, left


def _rel(run_dir: Path, path: str | Path) -> str:
    """``path`` relative to ``run_dir``; it may be given absolute, under ``run_dir`` or
    already relative to it."""
    path = Path(path)
    if path.is_absolute() or (run_dir != Path(".") and path.is_relative_to(run_dir)):
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    return path.as_posix()


def jsonable(obj: Any) -> Any:
    """``obj`` in plain JSON types: the one converter of advlens' JSON (files, attrs, configs).

    Mappings become dicts, tuples and arrays lists, NumPy scalars Python numbers, paths
    strings; anything else is returned as it is (``json`` refuses what it cannot write).
    """
    if isinstance(obj, Mapping):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_default(obj: Any) -> Any:
    """``default=`` for :func:`json.dumps`: :func:`jsonable`, or TypeError when it cannot."""
    out = jsonable(obj)
    if out is obj:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
    return out


def slug(text: str) -> str:
    """The file-name form of an attack, norm, layer or run name: lower case, ':' and '/'
    become '-', any other run of characters outside [a-z0-9._-] one '_' ("x" when empty).

    Store paths are made with it (``foolbox:FGSM`` -> ``foolbox-fgsm-linf.zarr``), so a change
    here renames existing stores.
    """
    text = str(text).lower().replace(":", "-").replace("/", "-")
    return re.sub(r"[^a-z0-9._-]+", "_", text).strip("_") or "x"
