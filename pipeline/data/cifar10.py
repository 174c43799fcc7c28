"""CIFAR-10 in its binary and python releases (the python release read with a restricted
unpickler, never plain :mod:`pickle`)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct

from advlens.data.base import Dataset, check_labels, check_split
from advlens.errors import DataError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def load(split: str, path: str | None) -> Dataset:
    """``split`` of the CIFAR-10 release in folder ``path`` (required)."""
    check_split(split)
    if not path:
        raise DataError(
            "data.source = 'cifar10' needs data.path: the folder of the CIFAR-10 binary "
            "(data_batch_*.bin, test_batch.bin) or python (data_batch_*, test_batch) release"
        )
    return _cifar10(Path(path), split)


_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"data.path = {str(root)!r}: folder not found (CIFAR-10 release folder)")
    for sub in ("", "cifar-10-batches-bin", "cifar-10-batches-py"):
        folder = root / sub if sub else root
        if any(folder.glob("test_batch*")) or any(folder.glob("data_batch_*")):
            return folder
    raise DataError(
        f"data.path = {str(root)!r} holds no CIFAR-10 batches: expected data_batch_1..5.bin and "
        "test_batch.bin (binary release) or data_batch_1..5 and test_batch (python release)"
    )


def _batch_files(folder: Path, split: str, suffix: str) -> list[Path]:
    if split == "test":
        files = [folder / f"test_batch{suffix}"]
        files = [f for f in files if f.is_file()]
    else:
        pat = re.compile(r"data_batch_(\d+)" + re.escape(suffix) + "$")
        found = [(int(m.group(1)), f) for f in folder.iterdir() if (m := pat.match(f.name))]
        files = [f for _, f in sorted(found)]
    return files


def _cifar10(root: Path, split: str) -> Dataset:
    folder = _cifar_dir(root)
    images, labels = [], []
    bin_files = _batch_files(folder, split, ".bin")
    py_files = _batch_files(folder, split, "")
    if bin_files:
        for f in bin_files:
            x, y = _read_cifar_bin(f)
            images.append(x)
            labels.append(y)
    elif py_files:
        for f in py_files:
            x, y = _read_cifar_py(f)
            images.append(x)
            labels.append(y)
    else:
        want = "test_batch(.bin)" if split == "test" else "data_batch_1..5(.bin)"
        raise DataError(f"{folder}: no CIFAR-10 {split} batches ({want} missing)")
    source = bin_files or py_files
    x = np.concatenate(images)
    y = np.concatenate(labels)
    check_labels(y, 10, ", ".join(str(f) for f in source))
    return Dataset(
        images=x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0,
        labels=y.astype(np.int64),
        index=np.arange(len(y), dtype=np.int64),
        name="cifar10",
        classes=_cifar_classes(folder),
    )


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
            f"({_CIFAR_RECORD} bytes: 1 label + 3x32x32 pixels); the file is truncated or not CIFAR-10"
        )
    rec = raw.reshape(-1, _CIFAR_RECORD)
    y = rec[:, 0]
    check_labels(y, 10, path)
    return rec[:, 1:], y


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 python release holds: dicts, lists, bytes, ints, ndarrays."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        # The release was pickled by Python 2 with numpy.core; numpy 2 writes numpy._core.
        # Imported from numpy._core directly: importing numpy.core warns on numpy 2.
        return {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str):  # noqa: D102
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not a type the CIFAR-10 python release contains"
            )
        return obj


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataError(
            f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (holds {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise DataError(f"{path}: CIFAR-10 batch lacks {missing}; keys are {sorted(d)}")
    x, y = d["data"], np.asarray(d["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' must be uint8 (N, 3072), got {getattr(x, 'dtype', type(x))} "
            f"{getattr(x, 'shape', '')}"
        )
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {len(x)} images but labels of shape {y.shape} ({y.dtype})")
    check_labels(y, 10, path)
    return x, y


def _cifar_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get("label_names")
        if isinstance(names, list) and len(names) == 10:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    text = folder / "batches.meta.txt"
    if text.is_file():
        names = [line.strip() for line in text.read_text().splitlines() if line.strip()]
        if len(names) == 10:
            return tuple(names)
    return CIFAR10_CLASSES
