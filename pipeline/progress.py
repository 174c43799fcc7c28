"""Progress reporting for every stage: tqdm bars with rate and time left, or plain log lines.

Bars go to stderr when it is a terminal; with ``--quiet`` (:func:`set_quiet`), with
``enabled=False`` or when stderr is not a terminal (CI logs, files), the same progress comes
out as rate-limited ``logging`` lines instead (``advlens.progress`` logger, INFO level), so a
log never fills with carriage-return noise.

Examples
--------
>>> from advlens import progress
>>> for batch in progress.track(range(4), "attack+extract", unit="batch"):
...     pass
>>> with progress.bar(total=10, desc="layers", unit="task") as pb:
...     pb.update(10)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
log = logging.getLogger("advlens.progress")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Switch every later bar to plain log lines (the CLI's ``--quiet``)."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


def _use_bar(enabled: bool | None) -> bool:
    if _QUIET or enabled is False:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    """A progress bar (tqdm) or its log-line twin; use as a context manager.

    Parameters
    ----------
    total : number of steps (None when unknown).
    desc : what is progressing, e.g. ``"embed"``.
    unit : the step's unit, e.g. ``"batch"``.
    enabled : None/True: a bar on a terminal, log lines elsewhere; False: log lines only.
    log_every : seconds between two log lines (the last step always logs).
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        enabled: bool | None = None,
        log_every: float = 10.0,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.log_every = log_every
        self._start = self._last_log = time.monotonic()
        self._postfix = ""
        self._bar = None
        if _use_bar(enabled):
            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if done or now - self._last_log >= self.log_every:
            self._last_log = now
            log.info(self.line())

    def set_postfix(self, **values: Any) -> None:
        """Show extra values (e.g. ``layer="conv2"``) beside the counts."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """One plain line: counts, percentage, rate and time left."""
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: {self.n}"
        if self.total:
            head += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            tail = f", {_fmt_seconds(left)} left" if left == left else ""
        else:
            head += f" {self.unit}"
            tail = ""
        extra = f" [{self._postfix}]" if self._postfix else ""
        return f"{head}, {rate:.3g} {self.unit}/s, {_fmt_seconds(elapsed)} elapsed{tail}{extra}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(
    total: int | None = None, desc: str = "", unit: str = "it", enabled: bool | None = None
) -> Progress:
    """A :class:`Progress` for manual ``update`` calls."""
    return Progress(total=total, desc=desc, unit=unit, enabled=enabled)


def track(
    iterable: Iterable[T],
    desc: str = "",
    *,
    total: int | None = None,
    unit: str = "it",
    enabled: bool | None = None,
) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress (``total`` defaults to ``len``)."""
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    with Progress(total=total, desc=desc, unit=unit, enabled=enabled) as pb:
        for item in iterable:
            yield item
            pb.update()


class forward_ticks:  # noqa: N801 - used as a context manager, like a function
    """Advance ``pb`` while an attack runs: ``images / expected`` per forward pass of ``model``.

    An attack batch takes as long as its ``expected`` forward passes (APGD: one per
    iteration and restart), so counting them makes the bar move within a batch. At most
    ``images - 1`` are shown; the caller adds the rest (:attr:`left`) once the batch is done,
    so the count ends exact however many passes the attack really made.
    """

    def __init__(self, model: Any, pb: Progress, images: int, expected: int | None) -> None:
        self.model, self.pb, self.images = model, pb, int(images)
        self.expected = int(expected) if expected else 0
        self.calls = self.shown = 0
        self._handle = None

    def _hook(self, *_: Any) -> None:
        self.calls += 1
        target = min(self.images - 1, self.images * self.calls // self.expected)
        if target > self.shown:
            self.pb.update(target - self.shown)
            self.shown = target

    @property
    def left(self) -> int:
        return self.images - self.shown

    def __enter__(self) -> forward_ticks:
        if self.expected > 0 and hasattr(self.model, "register_forward_hook"):
            self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()


def expected_forwards(attack: Any) -> int | None:
    """Forward passes an attack makes per batch, where it says (APGD, foolbox ``steps``)."""
    n_iter = getattr(attack, "n_iter", None) or (getattr(attack, "kwargs", None) or {}).get("steps")
    if not n_iter:
        return None
    targets = (
        getattr(attack, "n_target_classes", 1)
        if getattr(attack, "loss", "") == "dlr-targeted"
        else 1
    )
    return int(n_iter) * int(getattr(attack, "n_restarts", 1) or 1) * int(targets)


def redirect_logging() -> contextlib.AbstractContextManager[None]:
    """Route log lines through ``tqdm.write`` while bars are shown, so they never cut a bar."""

    return logging_redirect_tqdm(loggers=[logging.getLogger()])
