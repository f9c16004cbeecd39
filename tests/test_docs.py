"""The documentation cannot drift from the code: the site builds strictly, the tutorial's code runs, the API
reference names every public name, every picture comes from a test, and the front page keeps its commands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.support import docblocks

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TUTORIAL = DOCS / "tutorial" / "index.md"
CONNECT = "cluster = MochiCluster()"  # the tutorial's one line that starts a pool

# The front page's two commands, byte for byte (CI and users copy them).
INSTALL_AND_GENERATE = ('pip install -e ".[cpu,notebook,test]" && mochi-lab generate "a cat surfing a wave" -o cat.mp4 '
                        '--height 240 --width 432 --steps 16 --seed 42')
TEST_COMMAND = "python -m pytest -q"


def _documented(page: Path, prefix: str) -> set[str]:
    """Names a reference page documents: `::: prefix.NAME` blocks and `<!-- constants: ... -->` tables."""
    text = page.read_text()
    names = set(re.findall(rf"^::: {re.escape(prefix)}\.(\w+)\s*$", text, re.MULTILINE))
    for group in re.findall(r"<!-- constants: ([A-Za-z_ ]+) -->", text):
        names.update(group.split())
    return names


def test_the_api_reference_documents_every_public_name():
    import mochi_lab

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old path: the same module, its names
        from mochi_lab import widgets

    face = _documented(DOCS / "reference" / "api.md", "mochi_lab")
    widget_names = _documented(DOCS / "reference" / "widgets.md", "mochi_lab.display.widgets")
    # the face's widgets are documented once, on the widgets page
    assert set(mochi_lab.__all__) - face - widget_names == set(), "public names missing from reference/api.md"
    assert set(widgets.__all__) - widget_names == set(), "widgets missing from reference/widgets.md"
    assert face - set(mochi_lab.__all__) == set(), "reference/api.md documents names the package does not export"


def test_the_front_page_is_short_and_keeps_its_two_commands():
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    assert INSTALL_AND_GENERATE in lines
    assert TEST_COMMAND in lines


def _docs_script(name: str):
    """One of docs/'s scripts (pictures.py, render_notebooks.py) as a module; docs/ is not a package."""
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_picture_comes_from_a_test_and_is_shown():
    pictures = _docs_script("pictures")
    pages = "\n".join(p.read_text() for p in DOCS.rglob("*.md")) + (REPO / "README.md").read_text()
    shown = set(re.findall(r"assets/screenshots/([\w.-]+\.png)", pages))
    present = {p.name for p in pictures.DEST.glob("*.png")}
    assert present - set(pictures.PICTURES) == set(), "pictures in docs/ that no test writes (add them to pictures.py)"
    assert shown - set(pictures.PICTURES) == set(), "pages show pictures that no test writes"
    assert set(pictures.PICTURES) - shown == set(), "pictures that no page shows"
    for name, (_source, test) in pictures.PICTURES.items():
        assert (REPO / test).is_file(), f"{name}: its test {test} is gone"


def test_the_site_shows_each_example_notebook_as_one_clean_run_of_its_current_cells():
    """docs/notebooks/ holds notebooks/*.ipynb executed by docs/render_notebooks.py: not a hand-edited output, not
    a stale copy of a notebook that changed since, no failed cell and no live widget that needs a kernel."""
    render = _docs_script("render_notebooks")
    assert render.problems() == []
    for source in render.SOURCES.glob("*.ipynb"):
        rendered = json.loads((render.DEST / source.name).read_text())
        outputs = [o for c in rendered["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        assert any("text/html" in o.get("data", {}) for o in outputs), f"{source.name}: no view of a job or widget"


def test_a_stale_failed_or_missing_rendered_notebook_is_named(tmp_path):
    render = _docs_script("render_notebooks")
    sources, dest = tmp_path / "notebooks", tmp_path / "rendered"
    shutil.copytree(render.SOURCES, sources, ignore=shutil.ignore_patterns("*.py", "*.md"))
    shutil.copytree(render.DEST, dest)
    assert render.problems(sources, dest) == []

    first, second, third, fourth = sorted(sources.glob("*.ipynb"))
    nb = json.loads(first.read_text())
    nb["cells"][0]["source"] = ["# a title edited since the render"]
    first.write_text(json.dumps(nb))
    nb = json.loads((dest / second.name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    code[1]["outputs"].append({"output_type": "error", "ename": "AssertionError", "evalue": "", "traceback": []})
    code[2]["execution_count"] = None
    (dest / second.name).write_text(json.dumps(nb))
    nb = json.loads((dest / third.name).read_text())
    widget = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": ""}}
    next(c for c in nb["cells"] if c["cell_type"] == "code")["outputs"].append(widget)
    (dest / third.name).write_text(json.dumps(nb))
    (dest / fourth.name).unlink()

    found = "\n".join(render.problems(sources, dest))
    assert f"{first.name}: stale" in found
    assert f"{second.name}: code cell 2 failed" in found and f"{second.name}: not one run top to bottom" in found
    assert f"{third.name}: code cell 1 holds a live widget" in found
    assert f"docs/notebooks/{fourth.name}: not rendered" in found


def test_the_tutorial_runs_on_the_cheap_pool(mochi, tmp_path, monkeypatch):
    """Every block of the tutorial, on the session's real pool (Worker threads, SQLite, the tiny model)."""
    monkeypatch.chdir(tmp_path)  # the tutorial saves cat.mp4 and exports a folder where it runs
    namespace = {"__name__": "__docs__", "__pool__": mochi}
    checks = docblocks.run(TUTORIAL, namespace, replace={CONNECT: "cluster = __pool__"})
    assert checks >= 15
    assert (tmp_path / "cat.mp4").stat().st_size > 0


@pytest.mark.usefixtures("ray_local")
def test_the_tutorial_runs_verbatim_on_the_embedded_default(tiny_checkpoint, tmp_path):
    """The page as written, `MochiCluster()` included, in a fresh process: a Ray of its own, a new store."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MOCHI_LAB_DATA_DIR": str(tmp_path / "data"), "MOCHI_LAB_PERSISTENT": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "support" / "docblocks.py"), str(TUTORIAL)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"^\d+ checks passed$", proc.stdout, re.MULTILINE), proc.stdout[-2000:]


def test_the_site_builds_strictly(mkdocs, tmp_path):
    """`mkdocs build --strict`: every link, anchor, picture and API name resolves; the REST and CLI pages are
    generated from the code (docs/hooks.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "NO_MKDOCS_2_WARNING": "1"}
    start = time.monotonic()
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540, check=False)
    print(f"\nmkdocs build --strict: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    site = tmp_path / "site"
    api = (site / "reference" / "api" / "index.html").read_text()
    assert 'id="mochi_lab.MochiCluster"' in api and 'id="mochi_lab.MochiCluster.generate"' in api
    rest = (site / "reference" / "rest" / "index.html").read_text()
    assert "/generate" in rest and (site / "reference" / "openapi.json").is_file()
    assert "mochi-lab generate" in (site / "reference" / "cli" / "index.html").read_text()
    quickstart = (site / "notebooks" / "01_quickstart" / "index.html").read_text()
    assert "mochi-job" in quickstart and "data:video/mp4;base64," in quickstart  # a run's job view and video
