"""User-facing errors: the CLI prints these as one clear message, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdvlensError(Exception):
    """An error caused by input the user can fix; the message says what to do."""


class ConfigError(AdvlensError, ValueError):
    """A configuration key or value is invalid."""


class DataError(AdvlensError, ValueError):
    """A dataset file is missing or malformed."""


class StoreError(AdvlensError):
    """A Zarr store is missing, corrupted, incompatible or would be overwritten."""


def closest(name: str, valid: Iterable[str], n: int = 5) -> str:
    """Return a short 'did you mean' hint listing the valid names closest to ``name``."""
    valid = list(valid)
    near = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    shown = near or valid[:n]
    more = "" if len(valid) <= len(shown) else f" (of {len(valid)})"
    return f"closest valid names{more}: {', '.join(shown)}"
