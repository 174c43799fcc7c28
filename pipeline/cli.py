"""The ``advlens`` command line.

Each subcommand lives in its own module, which provides ``configure(parser)`` and
``main(args) -> int``; this file only wires them, so a command's imports (torch, zarr, ...)
are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from advlens import progress
from advlens._version import __version__
from advlens.errors import AdvlensError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("advlens.train", "train the default Fashion-MNIST CNN and cache its weights"),
    "run": ("advlens.run", "attack, extract, embed and score every layer (the main job)"),
    "layers": ("advlens.models.cli", "list a model's tappable layers with their output shapes"),
    "bench": ("advlens.bench", "benchmark t-SNE engines on equal terms"),
    "sweep": ("advlens.sweep", "run the layer analysis at growing sample sizes"),
    "compare": ("advlens.report.compare", "one curve figure and table over several runs"),
    "report": ("advlens.report.html", "(re)write a run's self-contained report.html"),
    "verify": ("advlens.verify", "check a run's stores, rows and maps; say what to recompute"),
    "export": ("advlens.export", "write a run's points for TensorBoard's embedding projector"),
    "config": ("advlens.configdoc", "every setting with its default, type and meaning"),
}


EXIT_CODES = """Exit status:
  0  done: for `run`, every layer task produced a row
  1  `run`: some tasks failed (metrics and report still written, the summary names them;
     rerun the same command to retry them); `verify`: something is damaged
  2  bad input: a setting, file or command line that advlens refuses, with a message
  130 interrupted: rerun the same command to resume"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand's module is imported and configured.

    The one deliberate lazy import of advlens (docs/design.md, "Imports"): a command module
    imports torch, zarr, ... at its top, so ``advlens --help`` and ``advlens config`` import
    only what they run. Without ``command`` every subcommand is configured.
    """
    parser = argparse.ArgumentParser(
        prog="advlens",
        description="Where, inside a network, do adversarial examples part ways with clean inputs?",
        epilog="Examples:\n  advlens run\n  advlens run --set data.n=200 --set attack.norms=linf\n"
        "  advlens layers --model small-cnn\n  advlens verify runs/default\n"
        "  advlens <command> --help\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"advlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)  # listed in --help; not the one that runs
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
        mod.configure(p)
        p.set_defaults(_main=mod.main)
    return parser


def _command(argv: list[str]) -> str:
    """The subcommand ``argv`` names (its first word that is one), else ``""``."""
    return next((a for a in argv if not a.startswith("-")), "") if argv else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2

    # --quiet swaps progress bars for periodic log lines; it does not silence the run.
    progress.set_quiet(args.quiet)
    # advlens' own messages at INFO; libraries (openTSNE, distributed, ...) only when they warn.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("advlens").setLevel(logging.INFO)
    try:
        with progress.redirect_logging():  # log lines print above the bars, not through them
            return int(args._main(args) or 0)
    except AdvlensError as exc:
        print(f"advlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advlens: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `advlens config | head`: the reader left; nothing went wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
