"""The example notebooks, unchanged, in a kernel that holds only a hub token and the gateway's URL.

nbval runs them on the embedded default (notebooks/); here each runs top to bottom through the session's
hub-authenticated gateway and its pool, and any cell error fails the test (as under nbval's lax mode: the
notebooks carry their own asserts). 04_cluster resizes and stops the pool, which on a shared cluster only
an admin may do and which would take the session's pool from every other test, so it runs on the
embedded default only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
# Everything that could reach the store or Ray directly: the kernel gets none of it.
DIRECT_ACCESS = ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST", "MOCHI_LAB_MODELS")


@pytest.mark.parametrize("name", ["01_quickstart", "02_prompt_sweep", "03_history"])
def test_a_notebook_runs_through_the_gateway_with_only_a_hub_token(name, gateway, hub, tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", work)
    env = {k: v for k, v in os.environ.items() if k not in DIRECT_ACCESS and not k.startswith("JUPYTERHUB_")}
    env.update({
        "MOCHI_LAB_GATEWAY": gateway.url,
        "JUPYTERHUB_API_TOKEN": hub.token("nora"),
        "JUPYTERHUB_USER": "alice",  # what a kernel claims changes nothing: the hub says nora
        "MOCHI_LAB_DATA_DIR": str(data),  # must stay empty: the kernel opens no store
        "MOCHI_LAB_CACHE_DIR": str(tmp_path / "cache"),
        "MOCHI_LAB_DOWNLOAD_DIR": str(tmp_path / "videos"),
    })
    nb = nbformat.read(work / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute(env=env)
    shown = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                    for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "nora" in shown or name == "03_history", "the handle's repr names the server's account"
    assert not data.exists(), "a gateway kernel must not create a store or write videos of its own"
    with gateway.client(hub.token("nora")) as c:
        assert c.get("/jobs/nora").json(), "the notebook's jobs are nora's"
    with gateway.client(hub.token("alice")) as c:
        assert not [j for j in c.get("/jobs/alice").json() if "history demo" in j["params"]["prompt"]
                    or "prompt-sweep-demo" == j.get("experiment")]
