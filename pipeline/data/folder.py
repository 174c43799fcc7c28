"""A folder of images, one sub-folder per class (``root/<split>/<class>/*`` or
``root/<class>/*``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from advlens.data.base import Dataset
from advlens.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load(split: str, path: str | None) -> Dataset:
    """The images under ``path`` (required); ``path/<split>`` when that folder exists."""
    if not path:
        raise DataError(
            "data.source = 'folder' needs data.path: a folder with one sub-folder per class"
        )
    return _image_folder(Path(path), split)


def _image_folder(root: Path, split: str) -> Dataset:
    """``root/<split>/<class>/*.png`` when ``root/<split>`` exists, else ``root/<class>/*``."""
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
