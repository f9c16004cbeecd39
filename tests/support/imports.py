"""The package's import graph, read from its source with `ast`: every module, every import as Python runs it
(lazy ones inside functions and those under TYPE_CHECKING marked as such), and module-level import cycles.
The floor plan's rules over it are tests/test_imports.py; the thin client's closure is
tests/client/test_thin_client.py."""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FACE = ""  # mochi_lab/__init__.py


@dataclass(frozen=True)
class Edge:
    target: str  # "mochi_lab.x.y" for the package's modules, the top package name for others
    lazy: bool  # inside a function: runs when called, not when the module is imported
    typing: bool  # under `if TYPE_CHECKING:`: never runs


def _modules() -> dict[str, Path]:
    """Module name relative to mochi_lab ("" for the face) -> file."""
    found: dict[str, Path] = {}
    base = ROOT / "mochi_lab"
    for path in base.rglob("*.py"):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, source: str, modules: Collection[str] = MODULES, is_package: bool = False) -> set[Edge]:
    """Every import in `source` (module `name`), as Python runs it: `from P import x` imports P, and P.x
    when that is a module."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[Edge] = set()

    def internal(target: str) -> bool:
        return target == "mochi_lab" or target.startswith("mochi_lab.")

    def add(target: str, lazy: bool, typing: bool) -> None:
        out.add(Edge(target if internal(target) else target.split(".")[0], lazy, typing))

    def visit(node: ast.AST, lazy: bool, typing: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, lazy, typing)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
                full = f"mochi_lab.{base}" if base else "mochi_lab"
            else:
                full = node.module or ""
            add(full, lazy, typing)
            for alias in node.names:
                sub = f"{full}.{alias.name}"
                if internal(full) and sub.removeprefix("mochi_lab.") in modules:
                    add(sub, lazy, typing)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and is_type_checking(node.test) and child in node.body:
                visit(child, lazy, True)
            else:
                visit(child, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), typing)

    visit(ast.parse(source), False, False)
    return out


def _internal(target: str, modules: Collection[str] = MODULES) -> str | None:
    """The package's module a target names ("" for the face), or None for a third-party one."""
    if target == "mochi_lab":
        return FACE
    if target.startswith("mochi_lab."):
        name = target[len("mochi_lab."):]
        while name and name not in modules:  # `mochi_lab.store.base.X` -> the module that holds X
            name = name.rpartition(".")[0]
        return name
    return None


def graph(sources: dict[str, str], packages: Collection[str] = ()) -> dict[str, dict[str, set[Edge]]]:
    """module -> the package's modules it imports -> how (the edges that reach them)."""
    names = set(sources)
    out: dict[str, dict[str, set[Edge]]] = {}
    for name, source in sources.items():
        targets: dict[str, set[Edge]] = {}
        for edge in imports(name, source, names, name in packages):
            target = _internal(edge.target, names)
            if target is not None and target != name:
                targets.setdefault(target, set()).add(edge)
        out[name] = targets
    return out


def find_cycle(graph_: dict[str, dict[str, set[Edge]]]) -> list[str] | None:
    """An import cycle among module-level imports (those that run when a module is imported), or None."""
    runs = {n: sorted(t for t, edges in ts.items() if any(not (e.lazy or e.typing) for e in edges))
            for n, ts in graph_.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in runs.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(runs):
        if name not in state and (found := visit(name)):
            return found
    return None


SOURCES = {name: path.read_text() for name, path in MODULES.items()}
GRAPH = graph(SOURCES, {name for name, path in MODULES.items() if path.name == "__init__.py"})
