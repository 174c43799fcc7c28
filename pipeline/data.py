"""Datasets: images in [0, 1] as float32 (N, C, H, W), labels, stable sample indices.

Sources: Fashion-MNIST IDX files (gzip or plain; Debian's ``dataset-fashion-mnist``),
CIFAR-10 in its binary and python releases (the python release read with a restricted
unpickler, never plain :mod:`pickle`), a folder of images (one sub-folder per class), and
learnable synthetic data for tests. :func:`stratified_sample` draws seeded, class-balanced
subsets.
"""

from __future__ import annotations

import gzip
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advlens.errors import DataError, closest

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
SOURCES = ("fashion-mnist", "cifar10", "folder", "synthetic")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64, indices (N,) into the split."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(
                f"images must be float32 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (n,) or self.labels.dtype != np.int64:
            raise ValueError(
                f"labels must be int64 ({n},), got {self.labels.dtype} {self.labels.shape}"
            )
        if self.index.shape != (n,) or self.index.dtype != np.int64:
            raise ValueError(
                f"index must be int64 ({n},), got {self.index.dtype} {self.index.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-sample image shape (C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, positions) -> Dataset:
        """The samples at ``positions`` (their ``index`` still points into the original split)."""
        pos = np.asarray(positions, dtype=np.int64)
        return Dataset(self.images[pos], self.labels[pos], self.index[pos], self.name, self.classes)


def load_dataset(source: str, split: str = "test", path: str | None = None) -> Dataset:
    """Load ``split`` (train or test) of ``source`` (fashion-mnist, cifar10, folder, synthetic).

    ``path`` is the folder holding the files (default for Fashion-MNIST:
    :data:`FASHION_MNIST_DIR`; required for cifar10 and folder).
    """
    if split not in SPLITS and source != "folder":
        raise DataError(f"data.split = {split!r}: valid splits are {', '.join(SPLITS)}")
    if source == "fashion-mnist":
        return _fashion_mnist(Path(path) if path else FASHION_MNIST_DIR, split)
    if source == "cifar10":
        if not path:
            raise DataError(
                "data.source = 'cifar10' needs data.path: the folder of the CIFAR-10 binary "
                "(data_batch_*.bin, test_batch.bin) or python (data_batch_*, test_batch) release"
            )
        return _cifar10(Path(path), split)
    if source == "folder":
        if not path:
            raise DataError(
                "data.source = 'folder' needs data.path: a folder with one sub-folder per class"
            )
        return _image_folder(Path(path), split)
    if source == "synthetic":
        return synthetic(n=1000 if split == "train" else 200, seed=1 if split == "train" else 0)
    raise DataError(f"data.source = {source!r} is not a known dataset; {closest(source, SOURCES)}")


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
    _check_labels(labels, 10, lfile)
    return Dataset(
        images=(images.astype(np.float32) / 255.0)[:, None],
        labels=labels.astype(np.int64),
        index=np.arange(len(labels), dtype=np.int64),
        name="fashion-mnist",
        classes=FASHION_CLASSES,
    )


def _check_labels(labels: np.ndarray, n_classes: int, where: object) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise DataError(f"{where}: label {int(bad)} outside [0, {n_classes})")


# --------------------------------------------------------------------------- CIFAR-10

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
    _check_labels(y, 10, ", ".join(str(f) for f in source))
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
    _check_labels(y, 10, path)
    return rec[:, 1:], y


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR-10 python release holds: dicts, lists, bytes, ints, ndarrays."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        from numpy._core.multiarray import _reconstruct

        # The release was pickled by Python 2 with numpy.core; numpy 2 writes numpy._core.
        # Resolved here directly: importing numpy.core warns on numpy 2.
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
    _check_labels(y, 10, path)
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


# --------------------------------------------------------------------------- image folder


def _image_folder(root: Path, split: str) -> Dataset:
    """``root/<split>/<class>/*.png`` when ``root/<split>`` exists, else ``root/<class>/*``."""
    from PIL import Image, UnidentifiedImageError

    folder = root / split if (root / split).is_dir() else root
    if not folder.is_dir():
        raise DataError(f"data.path = {str(root)!r}: folder not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>.png)")
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(c)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    pics = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pics.append(im.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: cannot read image ({exc})") from None
    gray = all(p.mode in ("1", "L", "I", "I;16", "F") for p in pics)
    mode = "L" if gray else "RGB"
    size = pics[0].size
    arrays = []
    for f, p in zip(files, pics, strict=True):
        if p.size != size:
            raise DataError(
                f"{f}: image size {p.size} differs from {files[0].name}'s {size}; "
                "all images of a folder dataset must have the same size"
            )
        a = np.asarray(p.convert(mode), dtype=np.float32) / 255.0
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    return Dataset(
        images=np.stack(arrays).astype(np.float32),
        labels=np.asarray(labels, np.int64),
        index=np.arange(len(files), dtype=np.int64),
        name="folder",
        classes=tuple(classes),
    )


# --------------------------------------------------------------------------- synthetic & sampling


def synthetic(
    n: int = 200,
    shape: tuple[int, int, int] = (1, 28, 28),
    n_classes: int = 10,
    seed: int = 0,
    noise: float = 0.15,
) -> Dataset:
    """Learnable synthetic images: one smooth random pattern per class plus Gaussian noise.

    The class patterns depend only on ``shape`` and ``n_classes`` (not on ``seed``), so data
    drawn with different seeds share them: train on one seed, test on another.
    """
    c, h, w = shape
    prng = np.random.default_rng([n_classes, c, h, w])
    # Smooth patterns: low-resolution noise upsampled, so convolutions and pooling see structure.
    low = prng.random((n_classes, c, max(2, h // 4), max(2, w // 4)))
    rows = np.linspace(0, low.shape[2] - 1, h).round().astype(int)
    cols = np.linspace(0, low.shape[3] - 1, w).round().astype(int)
    patterns = low[:, :, rows][:, :, :, cols]
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    images = patterns[labels] + noise * rng.standard_normal((n, c, h, w))
    return Dataset(
        images=np.clip(images, 0, 1).astype(np.float32),
        labels=labels.astype(np.int64),
        index=np.arange(n, dtype=np.int64),
        name="synthetic",
        classes=tuple(f"class{i}" for i in range(n_classes)),
    )


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of ``n`` samples, as evenly spread over the classes as they allow.

    Each class gets ``n // n_classes`` (the remainder going to seeded random classes); a class
    with too few samples gives all it has and the others make up the difference.
    """
    labels = np.asarray(labels)
    if n < 0 or n > len(labels):
        raise DataError(
            f"cannot sample {n} of {len(labels)} samples: data.n must be in [0, {len(labels)}]"
        )
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros(0, np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    # Water level: the largest L with sum(min(counts, L)) <= n; then one more sample for
    # `rest` seeded random classes that have more than L.
    level = 0
    while level < counts.max() and np.minimum(counts, level + 1).sum() <= n:
        level += 1
    quota = np.minimum(counts, level)
    rest = n - int(quota.sum())
    if rest:
        room = np.flatnonzero(counts > level)
        quota[rng.choice(room, size=rest, replace=False)] += 1
    picks = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)
