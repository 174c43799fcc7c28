"""Fashion-MNIST from its IDX files (gzip or plain; Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from advlens.data.base import Dataset, check_labels, check_split
from advlens.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load(split: str, path: str | None) -> Dataset:
    """``split`` of Fashion-MNIST from ``path`` (default :data:`FASHION_MNIST_DIR`)."""
    check_split(split)
    return _fashion_mnist(Path(path) if path else FASHION_MNIST_DIR, split)


_IDX_DTYPES: dict[int, type | str] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain), validating its magic number and size."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip file ({exc}); reinstall the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: truncated or padded IDX file ({len(raw)} bytes, header {dims} needs {expected})"
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(folder: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for stem, kind in ((f"{prefix}-images-idx3-ubyte", 3), (f"{prefix}-labels-idx1-ubyte", 1)):
        file = _find(folder, stem)
        if file is None:
            raise DataError(
                f"Fashion-MNIST file {stem}.gz not found in {folder}. Install it with "
                "`sudo apt-get install dataset-fashion-mnist` (files land in "
                f"{FASHION_MNIST_DIR}) or set data.path to a folder holding the IDX files."
            )
        arr = read_idx(file)
        if arr.ndim != kind or arr.dtype != np.uint8:
            raise DataError(
                f"{file}: expected a {kind}-D uint8 IDX array, got {arr.dtype} {arr.shape}"
            )
        arrays.append((file, arr))
    (ifile, images), (lfile, labels) = arrays
    if images.shape[1:] != (28, 28):
        raise DataError(f"{ifile}: images are {images.shape[1:]}, Fashion-MNIST images are 28x28")
    if len(images) != len(labels):
        raise DataError(
            f"{ifile} holds {len(images)} images but {lfile} holds {len(labels)} labels"
        )
    check_labels(labels, 10, lfile)
    return Dataset(
        images=(images.astype(np.float32) / 255.0)[:, None],
        labels=labels.astype(np.int64),
        index=np.arange(len(labels), dtype=np.int64),
        name="fashion-mnist",
        classes=FASHION_CLASSES,
    )
