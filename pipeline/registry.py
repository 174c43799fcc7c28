"""One registry shape for every family of interchangeable parts (docs/design.md, "Registries").

A :class:`Registry` maps a name to an object (a factory, an engine module, a loader). An
entry is either the object itself or a ``"package.module:attr"`` string that is imported on
first use, through :func:`advlens._optional.require`, so that an implementation's optional
dependency (cuML, Keras, foolbox, ...) is imported only when that implementation is asked for,
and a missing one says what to install. Besides exact names a registry may hold *patterns*
(a regular expression a whole name must match, shown to users as e.g. ``foolbox:<ClassName>``)
for open-ended families. An unknown name raises the registry's error class (ConfigError by
default) naming the setting, the value and the closest valid names::

    ENGINES = Registry("t-SNE engine", setting="embed.engine")
    ENGINES.register("opentsne", "advlens.embed.opentsne")     # lazy: imported by get()

    @MODELS.register("my-net")                                  # or as a decorator
    def build(request): ...                                     # a models.ModelRequest
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from advlens._optional import require
from advlens.errors import AdvlensError, ConfigError, closest

T = TypeVar("T")


def load(target: str) -> Any:
    """Import ``"package.module:attr"`` (or a bare ``"package.module"``) and return it."""
    module, _, attr = target.partition(":")
    obj: Any = require(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    target: Any
    shown: str
    names: Any  # None, a callable () -> iterable of names, or a "module:attr" string of one


class Registry(Generic[T]):
    """Name -> object, with lazy ``"module:attr"`` entries, patterns and did-you-mean errors.

    Parameters
    ----------
    kind : what the entries are, for messages ("t-SNE engine", "model", ...).
    setting : the configuration key that names an entry (``embed.engine``), for messages.
    error : the exception class an unknown name raises (a subclass of AdvlensError).
    """

    def __init__(self, kind: str, *, setting: str, error: type[AdvlensError] = ConfigError) -> None:
        self.kind = kind
        self.setting = setting
        self.error = error
        self._entries: dict[str, Any] = {}
        self._patterns: list[_Pattern] = []

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, target: T | str) -> T | str: ...

    def register(self, name: str, target: Any = None) -> Any:
        """Register ``target`` (an object or a ``"module:attr"`` string) as ``name``.

        A string target is always an import target, never a value.
        Without ``target``, a decorator that registers what it decorates. Registering a name
        again replaces the entry (a user may override a built-in).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{self.kind} registry: a name must be a non-empty string, not {name!r}"
            )
        if target is None:

            def deco(obj: T) -> T:
                self._entries[name] = obj
                return obj

            return deco
        self._entries[name] = target
        return target

    def register_pattern(
        self, pattern: str, target: T | str, *, shown: str, names: Any = None
    ) -> None:
        """Register ``target`` for every name that matches ``pattern`` as a whole.

        ``shown`` is how messages name the family (``foolbox:<ClassName>``); ``names``, a
        callable (or ``"module:attr"`` of one) listing the family's concrete names, lets
        :meth:`all_names` and the did-you-mean hint include them.
        """
        self._patterns.append(_Pattern(re.compile(pattern), target, shown, names))

    def names(self) -> list[str]:
        """The exact names, in registration order."""
        return list(self._entries)

    def patterns(self) -> list[str]:
        """How each pattern family is shown to users (``wrn-<depth>-<width>``)."""
        return [p.shown for p in self._patterns]

    def all_names(self) -> list[str]:
        """Exact names, then the concrete names each pattern family lists (where it can)."""
        out = self.names()
        for p in self._patterns:
            if p.names is not None:
                listing = load(p.names) if isinstance(p.names, str) else p.names
                out += [n for n in listing() if n not in out]
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or self._match(name) is not None)

    def _match(self, name: str) -> _Pattern | None:
        return next((p for p in self._patterns if p.regex.fullmatch(name)), None)

    def get(self, name: str) -> T:
        """The object registered as ``name`` (imported now when registered lazily).

        Raises the registry's error naming the setting, ``name`` and the closest valid names;
        :class:`~advlens._optional.MissingDependency` when a lazy entry's import fails.
        """
        if isinstance(name, str) and name in self._entries:
            target = self._entries[name]
        else:
            match = self._match(name) if isinstance(name, str) else None
            if match is None:
                raise self.unknown(name)
            target = match.target
        if isinstance(target, str):
            target = load(target)
        return target

    def unknown(self, name: object, valid: Iterable[str] | None = None) -> AdvlensError:
        """The error for an unknown ``name`` (raise it): setting, value, closest names."""
        valid = list(valid) if valid is not None else self.all_names()
        text = f"{self.setting} = {name!r} is not a known {self.kind}; {closest(str(name), valid)}"
        if self._patterns:
            text += f"; or one of the forms {', '.join(self.patterns())}"
        return self.error(text)
