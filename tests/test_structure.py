"""Structural checks over the source tree: import graph, layering, contract literals, and
the size of committed benchmark results.

Everything here reads files with `ast` (nothing is imported), so these tests run in well
under a second and need no torch. Each failure names the offending modules and lines.
"""

from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("chameleon", "odyssey", "planner", "profiler", "launch", "examples")
"""The project's importable top-level packages (DESIGN.md, "Where things live")."""

FORBIDDEN_IMPORTS = {
    "profiler": ("planner", "odyssey", "chameleon", "launch", "examples"),
    "planner": ("odyssey", "chameleon", "launch", "examples"),
    "odyssey": ("launch", "examples"),
    "chameleon": ("launch", "examples"),
}
"""Imports flow one way: launch -> odyssey/chameleon -> planner -> profiler."""

LAZY_IMPORT_ALLOWED = {
    "matplotlib": "plotting is an optional extra (`pip install .[plot]`)",
    "ray": "the Ray backend is optional and ~2 s to import",
    "transformers": "only for importing Hugging Face models, optional",
    "deepspeed": "optional; ~1.3 s to import and it probes accelerators on import",
    "tensorboard": "optional extra",
}
"""Third-party modules planner/ and profiler/ may import inside a function, and why: each
is an optional dependency or too heavy for every `import planner` to pay for."""

CONTRACT_MODULE = ROOT / "odyssey" / "contract.py"
LITERAL_SCAN_DIRS = (*PACKAGES, "benchmarks", "tests")
STORE_KEY_PREFIX = "odyssey/"
SOURCE_FILE_SUFFIXES = (".py", ".md")
"""A string like "odyssey/engine.py" names a file of the package, not a store key."""
ENV_NAME = re.compile(r"\bODYSSEY_[A-Z0-9_]+")
RESULTS_LIMIT_BYTES = 1_000_000


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a project module where possible."""

    source: str  # importing module, e.g. "planner.cost"
    target: str  # imported module, e.g. "planner.simulate" or "torch"
    path: Path
    line: int
    in_function: bool
    type_checking: bool

    def where(self) -> str:
        kind = " (in a function)" if self.in_function else (
            " (TYPE_CHECKING)" if self.type_checking else "")
        return f"{self.path.relative_to(ROOT)}:{self.line} {self.source} -> {self.target}{kind}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    """Every module of the project packages: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, in_function=False, type_checking=False):
    """Yield (import node, in_function, under `if TYPE_CHECKING`) for every import."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function, type_checking
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk_imports(child, True, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk_imports(ast.Module(body=[stmt], type_ignores=[]),
                                         in_function, True)
            for stmt in child.orelse:
                yield from _walk_imports(ast.Module(body=[stmt], type_ignores=[]),
                                         in_function, type_checking)
        else:
            yield from _walk_imports(child, in_function, type_checking)


def _resolve_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@cache
def imports() -> tuple[Import, ...]:
    """Every import in the project, `from x import y` resolved to `x.y` when y is a module."""
    mods = project_modules()
    out = []
    for module, path in mods.items():
        for node, in_fn, tc in _walk_imports(_parse(path)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_base(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for target in dict.fromkeys(targets):
                out.append(Import(module, target, path, node.lineno, in_fn, tc))
    return tuple(out)


def _top(name: str) -> str:
    return name.partition(".")[0]


def _components(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(comps, key=min)


def _shortest_cycle(edges: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while start not in prev:  # a component is strongly connected: start is reached
        reached = []
        for v in frontier:
            for w in sorted(edges[v] & comp):
                if w not in prev:
                    prev[w] = v
                    reached.append(w)
        frontier = reached
    path = [start]
    while (v := prev[path[-1]]) != start:
        path.append(v)
    return [start, *reversed(path[1:]), start]


def test_no_import_cycles():
    mods = project_modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for imp in imports():
        if imp.target in mods and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    comps = _components(edges)
    report = []
    for comp in comps:
        report.append(f"cycle among {len(comp)} modules, e.g. "
                      + " -> ".join(_shortest_cycle(edges, comp)) + "; imports inside it:")
        report.extend(f"    {imp.where()}" for imp in imports()
                      if imp.source in comp and imp.target in comp)
    assert not comps, "import cycles among project modules:\n" + "\n".join(report)


def test_layering():
    bad = [imp.where() for imp in imports()
           if _top(imp.target) in FORBIDDEN_IMPORTS.get(_top(imp.source), ())]
    assert not bad, ("imports against the layering launch -> odyssey/chameleon -> planner "
                     "-> profiler:\n" + "\n".join(bad))


def test_no_function_level_imports_in_planner_and_profiler():
    bad = [imp.where() for imp in imports()
           if imp.in_function and _top(imp.source) in ("planner", "profiler")
           and _top(imp.target) not in LAZY_IMPORT_ALLOWED]
    assert not bad, ("imports inside functions in planner/ or profiler/ (import at module "
                     "level; an optional heavy dependency goes in LAZY_IMPORT_ALLOWED "
                     "with its reason):\n" + "\n".join(bad))


def _docstring_ids(tree: ast.Module) -> set[int]:
    """Strings that are statements of their own: docstrings, also of fields and constants."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def _contract_literals(path: Path) -> list[str]:
    """Store keys and ODYSSEY_* names written as literals in one file (docstrings aside)."""
    tree = _parse(path)
    docs = _docstring_ids(tree)
    in_fstring: set[int] = set()
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v for v in node.values if isinstance(v, ast.Constant)]
            in_fstring.update(id(v) for v in parts)
            head, tail = (node.values[0], node.values[-1]) if node.values else (None, None)
            if (isinstance(head, ast.Constant) and str(head.value).startswith(STORE_KEY_PREFIX)
                    and not (isinstance(tail, ast.Constant)
                             and str(tail.value).endswith(SOURCE_FILE_SUFFIXES))):
                hits.append((node.lineno, f"store key f-string {ast.unparse(node)}"))
            names = ENV_NAME.findall("".join(str(v.value) for v in parts))
            hits.extend((node.lineno, f"env name {n} in an f-string") for n in names)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docs and id(node) not in in_fstring):
            if (node.value.startswith(STORE_KEY_PREFIX)
                    and not node.value.endswith(SOURCE_FILE_SUFFIXES)):
                hits.append((node.lineno, f"store key {node.value!r}"))
            hits.extend((node.lineno, f"env name {n}") for n in ENV_NAME.findall(node.value))
    rel = path.relative_to(ROOT)
    return [f"{rel}:{line} {what}" for line, what in sorted(set(hits))]


def test_contract_names_only_in_contract_module():
    bad = []
    for folder in LITERAL_SCAN_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path not in (CONTRACT_MODULE, Path(__file__).resolve()):  # this file: the patterns
                bad.extend(_contract_literals(path))
    assert not bad, ("store keys / ODYSSEY_* names spelled outside odyssey/contract.py "
                     "(use its constants and key functions):\n" + "\n".join(bad))


def _tracked_results() -> list[Path]:
    """Files under benchmarks/results/ that git tracks or would add (not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard", "benchmarks/results"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in sorted(set(out.decode().split("\0"))) if p]


def test_committed_benchmark_results_are_small():
    files = [p for p in _tracked_results() if p.is_file()]  # deleted, not yet staged: gone
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: -p.stat().st_size)[:8]
    listing = "\n".join(f"    {p.stat().st_size:>9} {p.relative_to(ROOT)}" for p in biggest)
    assert total < RESULTS_LIMIT_BYTES, (
        f"benchmarks/results/ holds {total} bytes in git (limit {RESULTS_LIMIT_BYTES}); raw "
        f"output belongs under runs/bench/ (benchmarks.common.out_dir()). Largest:\n{listing}")
