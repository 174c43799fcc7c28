"""The import rule of docs/design.md ("Module map"): a stage imports only what comes before it
in the data flow, and advlens' modules import each other without cycles.

Every import of every module counts: at module top, inside functions, and the lazy
``"advlens.x:attr"`` targets handed to a Registry or to importlib. Parsed with :mod:`ast`, so
nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stage of each module, lowest first; a module prefix covers its package ("advlens.models"
# covers advlens.models.wrn) unless a longer prefix names it. Keep in step with docs/design.md.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("advlens._version", "advlens.errors", "advlens._optional", "advlens._io",
              "advlens._env", "advlens.registry", "advlens.config", "advlens.progress",
              "advlens.kernels")),
    ("data", ("advlens.data",)),
    ("models", ("advlens.models",)),
    ("attacks", ("advlens.attacks",)),
    ("extract", ("advlens.extract",)),
    ("store", ("advlens.store",)),
    ("reduce", ("advlens.reduce",)),
    ("embed", ("advlens.embed",)),
    ("overlap", ("advlens.overlap",)),
    ("results", ("advlens.results",)),
    ("report", ("advlens.report",)),
    ("task", ("advlens.layer_task", "advlens.schedule")),
    ("run", ("advlens.run", "advlens.train", "advlens.verify", "advlens.export",
             "advlens.bench")),
    ("drivers", ("advlens.sweep", "advlens.eps_sweep", "advlens.api")),
    ("entry", ("advlens", "advlens.__main__", "advlens.cli", "advlens.configdoc",
               "advlens.models.cli")),
]  # fmt: skip
RANK = {prefix: i for i, (_, prefixes) in enumerate(STAGES) for prefix in prefixes}
LAZY_CALLS = {"register", "register_pattern", "import_module", "require", "load"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """advlens module name -> file, for pipeline/ (advlens) and kernels/ (advlens.kernels)."""
    out = {}
    for top, package in (("pipeline", "advlens"), ("kernels", "advlens.kernels")):
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def stage_of(module: str) -> int:
    """The rank of ``module``'s stage (longest matching prefix; the root package by name)."""
    best, rank = -1, None
    for prefix, r in RANK.items():
        covers = module == prefix or (prefix != "advlens" and module.startswith(prefix + "."))
        if covers and len(prefix) > best:
            best, rank = len(prefix), r
    if rank is None:
        raise KeyError(f"{module} has no stage: add it to STAGES here and to docs/design.md")
    return rank


def _resolve(name: str, known: set[str]) -> str | None:
    """The advlens module ``name`` (a dotted path, perhaps ``module.attr``) refers to."""
    name = name.partition(":")[0]
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(advlens module, line) for every import in ``path``: top, in-function, lazy targets."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from advlens import progress` imports the module advlens.progress
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in LAZY_CALLS:
                names = [
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("advlens.")
                ]
        for name in names:
            target = _resolve(name, known) if name.split(".")[0] == "advlens" else None
            if target is not None and target != module:
                found.add((target, node.lineno))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[tuple[str, int]]]:
    files = module_files(root)
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def backward_imports(graph: dict[str, set[tuple[str, int]]]) -> list[str]:
    """Every import of a later stage, as 'module:line imports target (stage a -> stage b)'."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets):
            a, b = stage_of(module), stage_of(target)
            if b > a:
                bad.append(
                    f"{module}:{line} imports {target} ({STAGES[a][0]} -> later {STAGES[b][0]})"
                )
    return bad


def cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    edges = {m: sorted({t for t, _ in ts}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_stage(graph):
    for module in graph:
        stage_of(module)  # KeyError names a module missing from STAGES
    assert {"advlens.registry", "advlens.results", "advlens.models.base"} <= set(graph)


def test_no_stage_imports_a_later_one(graph):
    bad = backward_imports(graph)
    assert not bad, "imports against the data flow (docs/design.md):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, f"import cycles among advlens modules: {found}"


def test_the_check_catches_a_bad_import(tmp_path):
    """A compute stage that imports the report, and a cycle, are both caught."""
    for top in ("pipeline", "kernels"):
        (tmp_path / top).mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "report.py").write_text("import advlens.overlap\n")
    (tmp_path / "pipeline" / "overlap.py").write_text(
        "def f():\n    from advlens.report import figures\n"
    )
    g = import_graph(tmp_path)
    assert backward_imports(g) == [
        "advlens.overlap:2 imports advlens.report (overlap -> later report)"
    ]
    assert cycles(g) == [["advlens.overlap", "advlens.report"]]
