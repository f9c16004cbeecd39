"""The quickstart notebook in a real JupyterLab, driven by Debian's headless Chromium through Playwright.

Run all cells, press Generate in the Studio, and wait for the new card's <video> to be playable.
A screenshot goes to artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "01_quickstart.ipynb"
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"  # Debian's build; Playwright's own browsers are never downloaded
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# JS predicates evaluated in the page
ALL_CELLS_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
NEW_VIDEO_PLAYABLE = """(before) => {
  const videos = [...document.querySelectorAll('.jp-OutputArea-output .mochi-studio video')];
  return videos.length > before && videos.every(v => v.readyState >= 2 && v.duration > 0);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab on 127.0.0.1 with private config, data, runtime and IPython dirs; yields (url, log)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    jupyter = {name: tmp_path / name for name in ("config", "data", "runtime", "ipython")}
    settings = jupyter["config"] / "lab" / "user-settings" / "@jupyterlab"
    write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
               {"fetchNews": "false", "checkForUpdates": False})  # the news pop-up covers the page
    # every cell in the DOM, so "all cells ran" can be read from their prompts
    write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST")}
    env.update(
        JUPYTER_CONFIG_DIR=str(jupyter["config"]), JUPYTER_DATA_DIR=str(jupyter["data"]),
        JUPYTER_RUNTIME_DIR=str(jupyter["runtime"]), IPYTHONDIR=str(jupyter["ipython"]),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        MOCHI_LAB_DATA_DIR=str(tmp_path / "mochi-data"),
        MOCHI_LAB_CACHE_DIR=os.environ.get("MOCHI_LAB_CACHE_DIR", str(tmp_path / "mochi-cache")),
        JUPYTERHUB_USER="alice",
    )
    env.pop("MOCHI_LAB_DOWNLOAD_DIR", None)  # links beside the notebook, inside the server's root
    port = free_port()
    log_path = tmp_path / "jupyterlab.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=", f"--ServerApp.root_dir={root}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url, log_path
    finally:
        _stop_kernels(url)
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down, and they their local Ray
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # our own process group (start_new_session)
            server.wait(10)
        log.close()


def _stop_kernels(url: str) -> None:
    """Shut kernels down gracefully first, so the kernel's Ray stops cleanly."""
    try:
        with urllib.request.urlopen(f"{url}/api/kernels", timeout=5) as resp:
            kernels = json.load(resp)
        for k in kernels:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels/{k['id']}", method="DELETE"), timeout=30)
    except OSError:
        pass


def test_quickstart_runs_and_a_generated_video_plays(lab):
    from playwright.sync_api import sync_playwright

    url, log_path = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}", timeout=120_000)
            idle = page.get_by_text("| Idle", exact=False)
            idle.first.wait_for(timeout=180_000)  # the kernel exists and is idle
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
            page.wait_for_function(ALL_CELLS_RAN, timeout=400_000, polling=1000)
            idle.first.wait_for(timeout=60_000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").count() == 0, \
                errors.all_inner_texts()

            studio = page.locator(".jp-OutputArea-output .mochi-studio")
            studio.scroll_into_view_if_needed()
            cards = studio.locator(".mochi-job-card")
            assert cards.count() == 1  # the notebook's own click
            before = studio.locator("video").count()
            studio.locator("button", has_text="Generate").click()
            page.wait_for_function(NEW_VIDEO_PLAYABLE, arg=before, timeout=180_000, polling=500)
            assert cards.count() == 2
            newest = cards.first
            assert newest.locator("video").evaluate("v => v.src.startsWith('blob:')")
            assert newest.locator("img").count() == 1  # the thumbnail
            assert newest.locator("a[download]").count() == 1  # the download link
            newest.scroll_into_view_if_needed()
            page.wait_for_timeout(500)  # let the first frames paint for the screenshot
            page.screenshot(path=str(ARTIFACTS / "quickstart.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "quickstart-failure.png"))
            print(log_path.read_text()[-4000:])
            raise
        finally:
            browser.close()
