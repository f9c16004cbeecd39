"""A private JupyterLab on 127.0.0.1 for the browser tests, and Debian's Chromium for Playwright.

`running_lab(tmp, root)` starts one with its own config, data, runtime and IPython dirs (the news pop-up
off, every cell kept in the DOM), the embedded default's environment (no RAY_ADDRESS, REDIS_URL,
gateway), and stops it, its sessions and kernels (and so their local Ray) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

CHROMIUM = "/usr/bin/chromium"  # Debian's build; Playwright's own browsers are never downloaded
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DIRECT = ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST", "MOCHI_LAB_WORKERS", "MOCHI_LAB_GATEWAY", "MOCHI_LAB_DOWNLOAD_DIR")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def notebook(cells: list[str]) -> dict:
    """A notebook (nbformat 4) of code cells, never run."""
    def cell(source: str) -> dict:
        return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}

    return {"cells": [cell(s) for s in cells], "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}


def api(url: str, path: str, method: str = "GET") -> Any:
    """The Jupyter server's REST API (`url` with its base URL); None for an empty answer."""
    req = urllib.request.Request(f"{url}/api/{path}", method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def stop_sessions(url: str) -> None:
    """End every session and kernel gracefully, so each kernel's local Ray stops cleanly."""
    try:
        for s in api(url, "sessions") or []:
            api(url, f"sessions/{s['id']}", "DELETE")
        for k in api(url, "kernels") or []:
            api(url, f"kernels/{k['id']}", "DELETE")
    except OSError:
        pass


@contextlib.contextmanager
def running_lab(tmp: Path, root: Path, *, base_url: str = "/", env: dict[str, str] | None = None,
                server_config: dict | None = None) -> Iterator[tuple[str, Path]]:
    """Yields (the server's URL with its base URL, the log file)."""
    jupyter = {name: tmp / name for name in ("config", "data", "runtime", "ipython")}
    settings = jupyter["config"] / "lab" / "user-settings" / "@jupyterlab"
    write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
               {"fetchNews": "false", "checkForUpdates": False})  # the news pop-up covers the page
    # every cell in the DOM, so "all cells ran" can be read from their prompts
    write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"})
    if server_config:
        write_json(jupyter["config"] / "jupyter_server_config.json", server_config)
    full = {k: v for k, v in os.environ.items() if k not in DIRECT}
    full.update(
        JUPYTER_CONFIG_DIR=str(jupyter["config"]), JUPYTER_DATA_DIR=str(jupyter["data"]),
        JUPYTER_RUNTIME_DIR=str(jupyter["runtime"]), IPYTHONDIR=str(jupyter["ipython"]),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        MOCHI_LAB_DATA_DIR=str(tmp / "mochi-data"),
        MOCHI_LAB_CACHE_DIR=os.environ.get("MOCHI_LAB_CACHE_DIR", str(tmp / "mochi-cache")),
        JUPYTERHUB_USER="alice",
        **(env or {}),
    )
    port = free_port()
    log_path = tmp / "jupyterlab.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=", f"--ServerApp.root_dir={root}",
         f"--ServerApp.base_url={base_url}"],
        cwd=root, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}{base_url.rstrip('/')}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(url, "status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url, log_path
    finally:
        stop_sessions(url)
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down, and they their local Ray
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # our own process group (start_new_session)
            server.wait(10)
        log.close()


# A cell's error is rendered as stderr text (data-mime-type application/vnd.jupyter.stderr, as a warning is);
# IPython's traceback ("Cell In[n], line m", for a SyntaxError too) tells it apart.
_ERRORS = """() => [...document.querySelectorAll(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
  .map(e => e.innerText).filter(t => /Traceback \\(most recent call last\\)|Cell In\\[\\d+\\], line \\d+/.test(t))"""

# Every code cell has run ([n]), or one failed: Run All stops at a failed cell and never runs the rest.
_RAN_OR_FAILED = """() => {
  if ((%s)().length) return "failed";
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)) && "ran";
}""" % _ERRORS


def cell_errors(page) -> list[str]:
    """The text of every cell error on the page."""
    return page.evaluate(_ERRORS)


def wait_all_ran(page, timeout_ms: int) -> None:
    """Wait until every code cell has run; fail at once, with the cell's error, when one fails."""
    outcome = page.wait_for_function(_RAN_OR_FAILED, timeout=timeout_ms, polling=1000).json_value()
    assert outcome == "ran", "a cell failed:\n" + "\n".join(cell_errors(page))[-4000:]


def save_notebook(page, path: Path) -> dict:
    """Save the open notebook from JupyterLab's File menu; the file at `path`, read once the server has
    answered the save (its mtime moves when the write starts, before the file is whole)."""
    with page.expect_response(lambda r: r.request.method == "PUT" and "/api/contents/" in r.url,
                              timeout=60_000) as answer:
        page.locator(".lm-MenuBar-itemLabel", has_text="File").first.click()
        page.locator('.lm-Menu-item[data-command="docmanager:save"]').click()
    assert answer.value.ok, f"JupyterLab's save answered {answer.value.status}"
    return json.loads(path.read_text())


def run_all(page, url: str, path: str):
    """Open the notebook at `path` (under the server's root) in JupyterLab, wait for its kernel, and run
    every cell from the Run menu; returns the kernel's "Idle" status locator."""
    page.goto(f"{url}/lab/tree/{path}", timeout=120_000)
    idle = page.get_by_text("| Idle", exact=False)
    idle.first.wait_for(timeout=180_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    return idle

