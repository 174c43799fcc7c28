"""mypy on pipeline/ (import package ``advlens``) and kernels/ (``advlens.kernels``), and a check
that every public function there has type hints on each parameter and its return.

The folders are not named like the packages, and the editable install maps them with an import
hook that mypy cannot follow (python/mypy#13392), so ``mypy pipeline kernels`` would name the
modules ``pipeline.*`` and not resolve ``import advlens``. This script hands mypy each file with
its real module name; the settings are ``[tool.mypy]`` in pyproject.toml. mypy alone would let an
unannotated function pass as ``Any``, hence the second check (``ast``; public: no leading
underscore, in a class without one; ``__init__`` needs no return hint). Exit status 1 on any
finding.

Usage: python .ci/typecheck.py  (``make lint`` runs it)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pipeline": "advlens", "kernels": "advlens.kernels"}


def sources() -> list[BuildSource]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            module = ".".join([package, *parts])
            out.append(BuildSource(str(path.relative_to(ROOT)), module))
    return out


def unannotated(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: name (what lacks a hint)`` for each public function of ``path``."""
    out = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if child.name.startswith("_") and child.name not in ("__init__", "__call__"):
                    continue
                a = child.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                if in_class and params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                params += [p for p in (a.vararg, a.kwarg) if p is not None]
                missing = [p.arg for p in params if p.annotation is None]
                if child.returns is None and child.name != "__init__":
                    missing.append("return")
                if missing:
                    where = f"{path.relative_to(root)}:{child.lineno}"
                    out.append(
                        f"{where}: {prefix}{child.name} has no type hint for {', '.join(missing)}"
                    )

    visit(ast.parse(path.read_text(), str(path)), "", False)
    return out


def main() -> int:
    # the config file's options (a placeholder target: the real ones are the sources above)
    _, options = process_options(["--config-file", str(ROOT / "pyproject.toml"), "-c", "pass"])
    try:
        result = build.build(sources(), options)
    except CompileError as err:  # syntax errors and the like
        print("\n".join(err.messages), file=sys.stderr)
        return 2
    for line in result.errors:
        print(line)
    hints = [line for src in sources() for line in unannotated(ROOT / str(src.path))]
    for line in hints:
        print(line)
    files = len(sources())
    n = sum(": error:" in e for e in result.errors)
    if n or hints:
        print(
            f"advlens typecheck: {n} mypy errors, {len(hints)} public functions without type "
            f"hints in pipeline/ and kernels/ ({files} files)"
        )
        return 1
    print(f"advlens typecheck: no issues in pipeline/ and kernels/ ({files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
