"""The dataset family's interface: :class:`Dataset` (what every source returns), the
:class:`DatasetLoader` signature and the checks every source shares.

Sources, one module each: ``fashion_mnist``, ``cifar10``, ``folder``, ``synthetic``;
registered in :data:`advlens.data.SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from advlens.errors import DataError

SPLITS = ("train", "test")


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
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, positions: np.ndarray | list[int]) -> Dataset:
        """The samples at ``positions`` (their ``index`` still points into the original split)."""
        pos = np.asarray(positions, dtype=np.int64)
        return Dataset(self.images[pos], self.labels[pos], self.index[pos], self.name, self.classes)


class DatasetLoader(Protocol):
    """``loader(split, path) -> Dataset``: ``split`` of the source whose files lie in ``path``
    (None: the source's default place, where it has one)."""

    def __call__(self, split: str, path: str | None) -> Dataset: ...


def check_split(split: str) -> None:
    """Refuse a split other than train or test (DataError naming it)."""
    if split not in SPLITS:
        raise DataError(f"data.split = {split!r}: valid splits are {', '.join(SPLITS)}")


def check_labels(labels: np.ndarray, n_classes: int, where: object) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise DataError(f"{where}: label {int(bad)} outside [0, {n_classes})")
