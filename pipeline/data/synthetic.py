"""Learnable synthetic images for tests: one smooth random pattern per class plus noise."""

from __future__ import annotations

import numpy as np

from advlens.data.base import Dataset, check_split


def load(split: str, path: str | None) -> Dataset:
    """1,000 training images (seed 1) or 200 test images (seed 0); ``path`` is not used."""
    check_split(split)
    return synthetic(n=1000 if split == "train" else 200, seed=1 if split == "train" else 0)


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
