"""Print every setting: its key, default, type and meaning (read from the config dataclasses: each field's ``doc``).

Each key can go into a TOML file under its [section] or onto the command line as
``--set section.key=value``. Given ``--config`` or ``--set``, a fourth column shows the value
that configuration gives.

Examples:
  advlens config
  advlens config --config configs/cifar10-wrn28-10.toml
  advlens config --set attack.eps.linf=8/255 | grep attack
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

from advlens.config import RunConfig, load


@dataclass(frozen=True)
class Setting:
    """One configuration key as the dataclasses define it."""

    key: str
    default: Any
    type: str
    doc: str


def sections() -> dict[str, type]:
    """Section name -> its config dataclass, in :class:`~advlens.config.RunConfig` order."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig)}


def settings() -> list[Setting]:
    """Every ``section.key`` of :class:`~advlens.config.RunConfig`, in definition order."""

    out = []
    for section, cls in sections().items():
        for f in fields(cls):
            default = f.default if f.default_factory is MISSING else f.default_factory()
            annotation = (
                f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            )
            out.append(Setting(f"{section}.{f.name}", default, annotation, f.metadata["doc"]))
    return out


def toml_value(v: Any) -> str:
    """``v`` as it would be written in TOML (``none`` for an unset optional value)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="also show the values of this TOML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="also show the values with these overrides",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    rows = settings()
    values = None
    if args.config or args.overrides:
        cfg = load(args.config, args.overrides).to_dict()
        values = [toml_value(cfg[s.key.split(".")[0]][s.key.split(".")[1]]) for s in rows]
    head = ["key", "default", "type"] + (["value"] if values else []) + ["meaning"]
    table = [
        [s.key, toml_value(s.default), s.type] + ([values[i]] if values else []) + [s.doc]
        for i, s in enumerate(rows)
    ]
    widths = [max(len(r[c]) for r in [head, *table]) for c in range(len(head) - 1)]
    classes = sections()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + "  " + head[-1])
    section = None
    for r in table:
        if r[0].split(".")[0] != section:
            section = r[0].split(".")[0]
            doc = (classes[section].__doc__ or "").strip().splitlines()[0]
            print(f"\n[{section}]  {doc}")
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0
