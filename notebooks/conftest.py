"""The environment of the notebooks' kernels under nbval (`--nbval-lax` in pyproject's addopts).

Each notebook's kernel gets, only while nbval starts it:
- its own data dir (store + videos), so one notebook's jobs and worker rows never show up in another's
  asserts, nor in the test session's store (whose workers would otherwise claim notebook jobs);
- no RAY_ADDRESS/REDIS_URL, so `MochiCluster()` takes the embedded default path, and MOCHI_LAB_PERSISTENT=0:
  a fresh local Ray in the kernel that stops with it (no runtime outliving the test run), SQLite;
- a download-link folder outside the repo (the Studio's links would otherwise land beside the notebook).
The pytest process keeps its own environment, so tests that start Ray clusters are unaffected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="mnb-", dir="/tmp"))

# The quickstart runs top to bottom in a real JupyterLab on the embedded default, every cell's error failing the
# test (tests/browser/test_quickstart_browser.py), and through the gateway (tests/gateway/test_notebooks.py):
# nbval would run it a third time.
collect_ignore = ["01_quickstart.ipynb"]


def kernel_env(notebook: Path) -> dict[str, str | None]:
    """Variables to set (None: unset) in the environment a notebook's kernel inherits."""
    home = _ROOT / notebook.stem[:2]
    return {
        "MOCHI_LAB_DATA_DIR": str(home / "data"),
        "MOCHI_LAB_DOWNLOAD_DIR": str(home / "videos"),
        # the tiny checkpoint is built once and shared (the test session's cache when there is one)
        "MOCHI_LAB_CACHE_DIR": os.environ.get("MOCHI_LAB_CACHE_DIR") or os.environ.get("MOCHI_LAB_TEST_CACHE")
        or str(_ROOT / "cache"),
        "JUPYTERHUB_USER": os.environ.get("JUPYTERHUB_USER") or "alice",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # the embedded default: no external Ray or Redis
        "RAY_ADDRESS": None,
        "REDIS_URL": None,
        "REDIS_HOST": None,
        "MOCHI_LAB_PERSISTENT": "0",
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    # nbval starts a notebook's kernel while setting up its first cell; the kernel copies os.environ.
    if item.path.suffix != ".ipynb":
        return (yield)
    saved = dict(os.environ)
    for key, value in kernel_env(item.path).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        return (yield)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(_ROOT, ignore_errors=True)  # kernels are gone by now: nbval stops each after its notebook
