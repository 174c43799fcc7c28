"""mypy on pipeline/ (import package ``advlens``) and kernels/ (``advlens.kernels``).

The folders are not named like the packages, and the editable install maps them with an import
hook that mypy cannot follow (python/mypy#13392), so ``mypy pipeline kernels`` would name the
modules ``pipeline.*`` and not resolve ``import advlens``. This script hands mypy each file with
its real module name; the settings are ``[tool.mypy]`` in pyproject.toml. Exit status: mypy's.

Usage: python .ci/typecheck.py  (``make lint`` runs it)
"""

from __future__ import annotations

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
    files = len(sources())
    if result.errors:
        n = sum(": error:" in e for e in result.errors)
        print(f"advlens typecheck: {n} errors in pipeline/ and kernels/ ({files} files)")
        return 1
    print(f"advlens typecheck: no issues in pipeline/ and kernels/ ({files} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
