"""Datasets: images in [0, 1] as float32 (N, C, H, W), labels, stable sample indices.

Sources (one module each, registered in :data:`SOURCES`): Fashion-MNIST IDX files (gzip or
plain; Debian's ``dataset-fashion-mnist``), CIFAR-10 in its binary and python releases (the
python release read with a restricted unpickler, never plain :mod:`pickle`), a folder of
images (one sub-folder per class), and learnable synthetic data for tests.
:func:`stratified_sample` draws seeded, class-balanced subsets.
"""

from __future__ import annotations

from advlens.data.base import SPLITS, Dataset, DatasetLoader
from advlens.data.cifar10 import CIFAR10_CLASSES
from advlens.data.fashion_mnist import FASHION_CLASSES, FASHION_MNIST_DIR, read_idx
from advlens.data.folder import IMAGE_SUFFIXES
from advlens.data.sampling import stratified_sample
from advlens.data.synthetic import synthetic
from advlens.errors import DataError
from advlens.registry import Registry

# name -> loader(split, path); every source needs only numpy and Pillow, imported on use
SOURCES: Registry[DatasetLoader] = Registry("dataset", setting="data.source", error=DataError)
SOURCES.register("fashion-mnist", "advlens.data.fashion_mnist:load")
SOURCES.register("cifar10", "advlens.data.cifar10:load")
SOURCES.register("folder", "advlens.data.folder:load")
SOURCES.register("synthetic", "advlens.data.synthetic:load")

# Input shape and class count per source whose images have one fixed size.
SHAPES = {
    "fashion-mnist": ((1, 28, 28), 10),
    "synthetic": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "SHAPES",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "DatasetLoader",
    "dataset_shape",
    "load_dataset",
    "read_idx",
    "stratified_sample",
    "synthetic",
]


def load_dataset(source: str, split: str = "test", path: str | None = None) -> Dataset:
    """Load ``split`` (train or test) of ``source`` (fashion-mnist, cifar10, folder, synthetic).

    ``path`` is the folder holding the files (default for Fashion-MNIST:
    :data:`FASHION_MNIST_DIR`; required for cifar10 and folder).
    """
    return SOURCES.get(source)(split, path)


def dataset_shape(
    source: str, path: str | None, split: str = "test"
) -> tuple[tuple[int, ...], int]:
    """Image shape (C, H, W) and class count of ``source``; a folder dataset is read."""
    if source in SHAPES:
        return SHAPES[source]
    ds = load_dataset(source, split, path)
    return ds.shape, len(ds.classes)
