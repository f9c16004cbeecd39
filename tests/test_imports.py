"""The one-way flow, checked over the source with `ast`: handle -> backend -> worker -> pipeline -> video.

Every import in the package counts, lazy ones inside functions too: an import that only runs later
still makes the lower layer depend on the upper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers first. A module may import its own layer or lower ones, never a higher one.
LAYERS: list[set[str]] = [
    {"version", "settings", "video", "provenance", "reprs", "params", "reaper", "hubauth", "logs", "private", "gate"},
    {"store", "store.base", "store.sqlite", "store.redis", "store.redis_lua"},
    {"pipelines", "pipelines.config", "pipelines.tiny", "pipelines.tokens", "pipelines.preview", "pipelines.cfg_parallel",
     "pipelines.mochi"},
    {"worker"},
    {"gang"},
    {"pool"},
    {"controller", "metrics", "runtime"},  # runtime: the local runtime starts the pool in its daemon
    {"cache", "sweep"},
    {"backend", "direct", "remote"},
    {"job", "experiment", "experiment_views"},
    {"client"},
    {""},  # the package face, mochi_lab/__init__.py
    {"gateway", "gateway_web"},
    {"cli", "widgets"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Third-party packages a layer must not touch: the store knows nothing of torch, pipelines nothing of Ray or Redis.
FORBIDDEN_EXTERNAL = {
    "store": {"torch", "diffusers", "transformers", "ray"},
    "pipelines": {"ray", "redis"},
    "reprs": {"torch", "ray", "redis"},
    "params": {"torch", "ray", "redis"},
    "metrics": {"torch", "ray"},
}


def _modules() -> dict[str, Path]:
    """Module name relative to mochi_lab ("" for the face) -> file; widgets/ is mochi_lab.widgets."""
    found: dict[str, Path] = {}
    for base, prefix in ((ROOT / "mochi_lab", ""), (ROOT / "widgets", "widgets")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(p for p in [prefix, *parts] if p)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module `name` imports (mochi_lab ones relative, others by top package)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
                full = f"mochi_lab.{base}" if base else "mochi_lab"
            else:
                full = node.module or ""
            for alias in node.names:  # `from mochi_lab.store import base` depends on the module, not the package
                sub = f"{full.removeprefix('mochi_lab').lstrip('.')}.{alias.name}".lstrip(".")
                out.add(f"{full}.{alias.name}" if full.startswith("mochi_lab") and sub in MODULES else full)
    return out


def _internal(target: str) -> str | None:
    if target == "mochi_lab":
        return ""
    if target.startswith("mochi_lab."):
        name = target[len("mochi_lab."):]
        while name and name not in MODULES:  # `mochi_lab.store.base.X` -> the module that holds X
            name = name.rpartition(".")[0]
        return name
    return None


def _layer(name: str) -> int:
    top = name.split(".")[0] if name.startswith("widgets") else name
    if top not in LAYER:
        raise AssertionError(f"mochi_lab.{name} has no layer in tests/test_imports.py: place it in the flow")
    return LAYER[top]


GRAPH = {name: {t for t in map(_internal, _imports(name, path)) if t is not None and t != name}
         for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_runs_against_the_flow(name):
    upward = [t for t in GRAPH[name] if _layer(t) > _layer(name)]
    assert not upward, f"mochi_lab.{name} imports {['mochi_lab.' + t if t else 'mochi_lab' for t in upward]}"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(f"mochi_lab.{c}" if c else "mochi_lab" for c in cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_widgets_and_reprs_use_only_the_public_api():
    for name, targets in GRAPH.items():
        if name.startswith("widgets"):
            bad = {t for t in targets if not (t in ("", "reprs") or t.startswith("widgets"))}
            assert not bad, f"mochi_lab.{name} reaches past the public API: {sorted(bad)}"
    assert GRAPH["reprs"] == set(), "reprs must be a leaf: plain data in, HTML out"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_EXTERNAL))
def test_layers_keep_out_of_each_others_dependencies(layer):
    for name, path in MODULES.items():
        if name == layer or name.startswith(layer + "."):
            tops = {t.split(".")[0] for t in _imports(name, path)}
            assert not tops & FORBIDDEN_EXTERNAL[layer], f"mochi_lab.{name} imports {sorted(tops & FORBIDDEN_EXTERNAL[layer])}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules bite: a store module importing the handle is caught as upward and as a cycle."""
    source = "from mochi_lab.client import MochiCluster\n"
    path = tmp_path / "base.py"
    path.write_text(source)
    targets = {_internal(t) for t in _imports("store.base", path)}
    assert "client" in targets and _layer("client") > _layer("store.base")
