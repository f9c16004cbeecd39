"""The floor plan, checked over the source with `ast`: which room may import which.

Rooms: the client (a notebook or script), the display (the notebook's front end), the gateway (the
multi-user service), the pool and the worker (Ray actors), over the shared modules (params, config, model, logs,
private, video, version, sweep, queue_eta, adapters, lora_refs, store, pipelines, extras, looptask). Every import
counts, lazy ones inside functions too: an import that only runs later still makes one room depend on another.
`from mochi_lab import x` counts as an import of the package face, as Python runs it: modules below the face import
the defining module.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys

import pytest

from mochi_lab._moved import MOVED_NAMES
from tests.support.imports import (
    FACE,
    GRAPH,
    MODULES,
    ROOT,
    SOURCES,
    Edge,
    find_cycle,
    graph,
    imports,
    is_type_checking,
)

ROOMS = ("client", "display", "gateway", "pool", "worker")
SHARED = {"params", "config", "model", "logs", "private", "video", "version", "sweep", "queue_eta", "adapters", "lora_refs",
          "store", "pipelines", "_moved", "extras", "looptask"}
TOP = {"cli"}  # the command line: uses every room, as a user would
# What each room must not import (a room may always import itself and the shared modules).
FORBIDDEN: dict[str, set[str]] = {
    "shared": {*ROOMS, "top", "face"},
    "worker": {"pool", "gateway", "client", "display", "top", "face"},
    "pool": {"gateway", "client", "display", "top", "face"},
    "client": {"gateway", "display", "pool", "worker", "top", "face"},
    "display": {"gateway", "pool", "worker", "top", "face"},
    "gateway": {"top", "face"},
    "top": {"face"},
}
# The direct backend runs the store and the pool in the caller's process.
ALLOWED = {("client.direct", "pool")}
# Module to module, no more: the HTTP client and its wire client speak the gateway's wire (its routes, bodies and
# error table), and nothing else of the gateway; the wire is a leaf over the shared modules
# (test_the_wire_is_a_leaf). Importing it runs the gateway package's face, which loads nothing (`lazy_names`).
ALLOWED_MODULES = {(client, gateway) for client in ("client.http", "client.wire_client")
                   for gateway in ("gateway.wire", "gateway")}
# The handle's rich display (`_repr_html_`, the live view) renders through the display, imported inside the
# method that shows it: a script that never displays loads no Jinja2.
ALLOWED_LAZY = {("client", "display")}
# Third-party packages a module must not touch: the store knows nothing of torch, pipelines nothing of Ray or Redis.
FORBIDDEN_EXTERNAL = {
    "store": {"torch", "diffusers", "transformers", "ray"},
    "model": {"torch", "diffusers", "transformers", "ray", "redis", "httpx", "fastapi"},
    "pipelines": {"ray", "redis"},
    **{f"display.{view}": {"torch", "ray", "redis"} for view in ("reprs", "values", "progress", "notes")},
    "params": {"torch", "ray", "redis"},
    "lora_refs": {"torch", "ray", "redis", "httpx", "fastapi"},
    "adapters": {"torch", "diffusers", "transformers", "safetensors", "ray", "redis", "httpx", "fastapi"},  # the client loads it
    "pool.metrics": {"torch", "ray"},
    "gateway.wire": {"fastapi", "starlette", "uvicorn", "httpx", "torch", "ray", "redis"},  # the client loads it
}


def room(name: str) -> str:
    top = name.split(".")[0]
    if name == FACE:
        return "face"
    if top in ROOMS:
        return top
    if top in SHARED:
        return "shared"
    if top in TOP:
        return "top"
    raise AssertionError(f"mochi_lab.{name} has no room in tests/test_imports.py: place it in the floor plan")


def against_the_plan(name: str, targets: dict[str, set[Edge]]) -> list[str]:
    """The imports of `name` that its room may not make."""
    bad = []
    for target, edges in sorted(targets.items()):
        there = room(target)
        if there not in FORBIDDEN.get(room(name), set()):
            continue
        if any(name == src or name.startswith(src + ".") for src, dst in ALLOWED if dst == there):
            continue
        if (name, target) in ALLOWED_MODULES:
            continue
        if (room(name), there) in ALLOWED_LAZY and all(e.lazy or e.typing for e in edges):
            continue
        bad.append(f"mochi_lab.{target}" if target else "mochi_lab (the package face)")
    return bad


def test_every_module_has_a_room():
    for name in MODULES:
        room(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != FACE))
def test_no_import_crosses_the_plan(name):
    bad = against_the_plan(name, GRAPH[name])
    assert not bad, f"mochi_lab.{name} ({room(name)}) imports {bad}"


def test_there_is_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(f"mochi_lab.{c}" if c else "mochi_lab" for c in cycle)


def test_widgets_drive_the_handle_they_are_given():
    """A widget uses the handle or job a user passes it: no client module at run time, type hints only."""
    for name, targets in GRAPH.items():
        if name.startswith("display.widgets"):
            client = sorted(t for t, edges in targets.items()
                            if room(t) == "client" and not all(e.typing for e in edges))
            assert not client, f"mochi_lab.{name} imports {client}"


def test_the_wire_is_a_leaf():
    """The gateway's wire, which the client imports, imports only the shared modules: no other gateway module."""
    assert {t for t in GRAPH["gateway.wire"] if room(t) != "shared"} == set()


# reprs and the modules it is built on: a record's values as text, a job's progress, the notes beside it
VIEWS = {"display.reprs", "display.values", "display.progress", "display.notes"}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_reprs_is_a_leaf(name):
    outside = sorted(set(GRAPH[name]) - VIEWS)
    assert not outside, f"mochi_lab.{name} imports {outside}: reprs and its views must be a leaf, plain data in, HTML out"


@pytest.mark.parametrize("prefix", sorted(FORBIDDEN_EXTERNAL))
def test_modules_keep_out_of_each_others_dependencies(prefix):
    for name, source in SOURCES.items():
        if name == prefix or name.startswith(prefix + "."):
            tops = {e.target for e in imports(name, source, is_package=MODULES[name].name == "__init__.py")
                    if not e.target.startswith("mochi_lab")}
            bad = sorted(tops & FORBIDDEN_EXTERNAL[prefix])
            assert not bad, f"mochi_lab.{name} imports {bad}"


@pytest.mark.parametrize("name", ["", "client"])
def test_a_lazy_face_lists_what_it_loads(name):
    """`_HOMES` (what __getattr__ loads), `__all__` and the type checkers' imports name the same things."""
    tree = ast.parse(SOURCES[name])
    values = {t.id: node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
              for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    homes, exported = ast.literal_eval(values["_HOMES"]), ast.literal_eval(values["__all__"])
    typed = {alias.name: node.module
             for block in tree.body if isinstance(block, ast.If) and is_type_checking(block.test)
             for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert sorted(exported) == sorted(homes) and typed == homes
    for home in set(homes.values()):
        assert home.removeprefix("mochi_lab.") in MODULES, home


def test_the_checker_sees_violations():
    """The rules bite, on a made-up package: an upward import, a face import, a module-level cycle."""
    sources = {
        "": "",
        "store.base": "from mochi_lab.client.cluster import MochiCluster\n",  # shared -> client
        "client.cluster": "from mochi_lab import Job\nfrom mochi_lab.store.base import X\n",  # the face; a cycle
        "client.job": "def show():\n    from mochi_lab.display.reprs import job_html\n",  # lazy display: allowed
        "client.http": "from mochi_lab.display.reprs import job_html\n",  # module-level display: not allowed
        "client.direct": "from mochi_lab.pool import runtime\n",  # the direct backend runs the pool
        "client.backend": "from mochi_lab.gateway.wire import url\n",  # only client.http and wire_client speak it
        "gateway.wire": "",
        "gateway.app": "",
        "display.reprs": "",
        "pool": "",
        "pool.runtime": "",
        "worker.loop": "from mochi_lab.pool.runtime import X\n",  # worker -> pool
    }
    made_up = graph(sources)
    assert against_the_plan("store.base", made_up["store.base"]) == ["mochi_lab.client.cluster"]
    assert against_the_plan("client.cluster", made_up["client.cluster"]) == ["mochi_lab (the package face)"]
    assert against_the_plan("client.job", made_up["client.job"]) == []
    assert against_the_plan("client.http", made_up["client.http"]) == ["mochi_lab.display.reprs"]
    assert against_the_plan("client.direct", made_up["client.direct"]) == []
    assert against_the_plan("client.backend", made_up["client.backend"]) == ["mochi_lab.gateway.wire"]
    assert against_the_plan("client.http", graph({**sources, "client.http": "from mochi_lab.gateway.wire import url\n"
                                                  "from mochi_lab.gateway.app import x\n"})["client.http"]) == [
        "mochi_lab.gateway.app"]
    assert against_the_plan("worker.loop", made_up["worker.loop"]) == ["mochi_lab.pool.runtime"]
    assert find_cycle(made_up) == ["client.cluster", "store.base", "client.cluster"]
    assert find_cycle(graph({**sources, "store.base": ""})) is None


def test_importing_the_package_loads_no_heavy_dependency():
    code = ("import sys, mochi_lab; mochi_lab.Settings; "
            "print(sorted({'torch', 'ray', 'diffusers', 'httpx', 'fastapi', 'ipywidgets'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("old", sorted(MOVED_NAMES))
def test_a_moved_name_answers_at_its_old_home_with_a_warning(old):
    """For one release: the same object, and a DeprecationWarning that names the new home."""
    module = importlib.import_module(old)
    for name, home in MOVED_NAMES[old].items():
        assert name not in vars(module), f"{old}.{name} is defined or imported there: it answers without a warning"
        with pytest.warns(DeprecationWarning, match=re.escape(f"{old}.{name} moved to {home}.{name}")):
            value = getattr(module, name)
        assert value is getattr(importlib.import_module(home), name)


def test_no_module_imports_a_moved_name_from_its_old_home():
    """The package and its tests import each moved name from its home (the renovation's codemod rewrites them)."""
    bad = []
    for path in [*MODULES.values(), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in MOVED_NAMES:
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                        for a in node.names if a.name in MOVED_NAMES[node.module]]
    assert not bad, bad
