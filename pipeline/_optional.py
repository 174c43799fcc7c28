"""Optional heavy dependencies, imported only when used, with an install hint."""

from __future__ import annotations

import importlib
from types import ModuleType

from advlens.errors import AdvlensError

HINTS = {
    "cupy": "pip install cupy-cuda12x  (or cupy-cuda13x for CUDA 13)",
    "cuml": "pip install cuml-cu12 (or cuml-cu13), from NVIDIA's package index",
    "dask_cuda": "pip install dask-cuda",
    "foolbox": "pip install foolbox",
    "openTSNE": "pip install openTSNE",
    "keras": "pip install keras h5py",
    "h5py": "pip install h5py",
    "timm": "pip install timm",
    "torchvision": "pip install torchvision",
    "pandas": "pip install pandas",
    "tensorboard": "pip install tensorboard",
}


class MissingDependency(AdvlensError, ImportError):
    """An optional package is needed for what was asked and is not installed."""


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = HINTS.get(top, f"pip install {top}")
        what = f" for {feature}" if feature else ""
        raise MissingDependency(
            f"{module!r} is needed{what} but is not installed ({exc}). Install it with: {hint}"
        ) from exc


def has(module: str) -> bool:
    """True when ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
