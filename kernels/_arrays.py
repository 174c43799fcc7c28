"""Array-type dispatch shared by the kernels: numpy, cupy and torch (CPU or CUDA) inputs.

Torch and cupy are looked up in ``sys.modules`` only: an input of either type means its library
is already imported, so plain numpy callers never pay for importing them.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from advlens._optional import require
from advlens.errors import ConfigError, DataError


def is_torch(a: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def is_cupy(a: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def to_backend(a: Any, feature: str) -> tuple[Any, Any, Callable[[Any], Any]]:
    """Return ``(array, xp, back)``: a numpy or cupy view of ``a``, its namespace, and a function
    that turns a result array of that namespace back into ``a``'s type.

    Torch CUDA tensors go to cupy through DLPack (no host copy); torch CPU tensors to numpy.
    """
    if is_torch(a):
        torch = sys.modules["torch"]
        t = a.detach()
        if t.is_cuda:
            cp = require("cupy", feature)
            return cp.from_dlpack(t), cp, torch.from_dlpack
        return t.numpy(), np, torch.from_numpy
    if is_cupy(a):
        return a, sys.modules["cupy"], _identity
    return np.asarray(a), np, _identity


def _identity(a: Any) -> Any:
    return a


def to_numpy(a: Any) -> np.ndarray:
    """Host copy of a numpy/cupy/torch array (no copy for numpy)."""
    if is_torch(a):
        return a.detach().cpu().numpy()
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def check_k(k: Any, n: int, what: str = "points") -> int:
    """Validate a neighbour count: 1 <= k <= n - 1 (the point itself is excluded)."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ConfigError(f"k = {k!r}: must be an integer >= 1") from None
    if k < 1:
        raise ConfigError(f"k = {k}: must be at least 1")
    if k > n - 1:
        raise ConfigError(
            f"k = {k} is larger than the {n - 1} other {what} available (n = {n}, the point "
            f"itself is excluded): use k <= {max(n - 1, 0)} or more points"
        )
    return k


def check_points(x: Any, xp: Any, dims: int | None) -> None:
    """Shape (n, d) (d == dims when given), real dtype, finite values (numpy, cupy or torch)."""
    if x.ndim != 2 or (dims is not None and x.shape[1] != dims):
        want = f"(n, {dims})" if dims is not None else "(n, d)"
        raise DataError(f"points have shape {tuple(x.shape)}: expected {want}")
    if is_torch(x):
        kind = "f" if x.dtype.is_floating_point else "c" if x.dtype.is_complex else "i"
        kind = "b" if x.dtype == sys.modules["torch"].bool else kind
    else:
        kind = x.dtype.kind
    if kind not in "fiu":
        raise DataError(f"points have dtype {x.dtype}: expected a real (float or int) array")
    if kind == "f":
        bad = int((~xp.isfinite(x)).any(1).sum())
        if bad:
            raise DataError(
                f"{bad} of {x.shape[0]} points contain NaN or inf: drop or fix them first"
            )
