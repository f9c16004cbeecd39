"""README's installs enable the save hook: after `pip install -e .` (the quickstart's) and after `pip install .`,
the Jupyter server of that environment loads mochi_lab.display.widgets.save_hook from the environment's own config,
and a notebook it saves keeps the Studio's static stand-in, not the live widget.

Each install goes into a fresh venv (seeing this interpreter's packages, so nothing is downloaded: no
dependencies, no build isolation) from a copy of the repository, as a user's clone would have it. The server
is jupyter_server's own ServerApp, initialised in that venv with its config path; the notebook is saved through
its contents manager, the path a browser's save takes.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.venvs import clone, make_venv, run

HOOK = "mochi_lab.display.widgets.save_hook"

# Run by the venv's python: which config dirs enable the hook, and what a save through the server writes.
SERVER = """
import asyncio, inspect, json, sys
from pathlib import Path

import nbformat
from jupyter_core.paths import jupyter_config_path
from jupyter_server.serverapp import ServerApp
from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME

HOOK = "mochi_lab.display.widgets.save_hook"
root = Path(sys.argv[1])

def enables(folder):
    files = [folder / "jupyter_server_config.json", *sorted((folder / "jupyter_server_config.d").glob("*.json"))]
    for f in files:
        if f.is_file() and json.loads(f.read_text()).get("ServerApp", {}).get("jpserver_extensions", {}).get(HOOK):
            return True
    return False

app = ServerApp()
app.initialize(argv=[f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False", "--ServerApp.ip=127.0.0.1",
                     "--ServerApp.port=0"])
live = nbformat.v4.new_output("display_data", data={WIDGET_MIME: {"model_id": "abc", "version_major": 2},
                                                    "text/plain": "Studio"},
                              metadata={"mochi_lab": {"live_widget": True}})
stand_in = nbformat.v4.new_output("display_data", data={STATIC_MIME: "<div class='mochi-studio-static'>a boat</div>",
                                                        "text/plain": ""})
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("studio", outputs=[live, stand_in])])
saved = app.contents_manager.save({"type": "notebook", "format": "json", "content": nb}, "saved.ipynb")
if inspect.isawaitable(saved):
    asyncio.run(saved)
outputs = nbformat.read(root / "saved.ipynb", as_version=4).cells[0].outputs  # text joined, as front ends read it
print(json.dumps({"enabled_in": [str(d) for d in map(Path, jupyter_config_path()) if enables(d)],
                  "extensions": sorted(app.extension_manager.extensions), "outputs": outputs}))
"""


@pytest.mark.parametrize("editable", [True, False], ids=["pip-install-e", "pip-install"])
@pytest.mark.usefixtures("package_install")
def test_an_install_enables_the_save_hook_in_its_jupyter_server(editable, tmp_path):
    src = clone(tmp_path / "clone")
    venv = tmp_path / "venv"
    # Only the venv's own config and this test's empty folders: no user's ~/.jupyter, user site or PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_") and k != "PYTHONPATH"}
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[var] = str(tmp_path / var.lower())
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    python = make_venv(venv, env, system_site_packages=True)
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *(["-e"] if editable else []),
         src], env)
    own = venv / "etc" / "jupyter"
    assert json.loads((own / "jupyter_server_config.d" / "mochi_lab.json").read_text()) == \
        {"ServerApp": {"jpserver_extensions": {HOOK: True}}}

    root = tmp_path / "notebooks"
    root.mkdir()
    shown = json.loads(run([python, "-c", SERVER, root], env, timeout=120).strip().splitlines()[-1])
    assert str(own) in shown["enabled_in"] and HOOK in shown["extensions"]
    # saved through the server: the live widget left out, its stand-in kept as HTML
    assert [o["data"] for o in shown["outputs"]] == \
        [{"text/html": "<div class='mochi-studio-static'>a boat</div>", "text/plain": ""}]
