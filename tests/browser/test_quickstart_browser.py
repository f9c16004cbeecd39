"""The quickstart notebook in a real JupyterLab, driven by Debian's headless Chromium through Playwright.

Run all cells, press Generate in the Studio, and wait for the new card's <video> to be playable.
A screenshot goes to artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.labkit import CHROMIUM, CHROMIUM_ARGS, cell_errors, run_all, running_lab, wait_all_ran

pytestmark = pytest.mark.usefixtures("chromium")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "01_quickstart.ipynb"
ARTIFACTS = REPO / "artifacts" / "browser"

# JS predicates evaluated in the page
NEW_VIDEO_PLAYABLE = """(before) => {
  const videos = [...document.querySelectorAll('.jp-OutputArea-output .mochi-studio video')];
  return videos.length > before && videos.every(v => v.readyState >= 2 && v.duration > 0);
}"""


@pytest.fixture
def lab(tmp_path):
    """A private JupyterLab serving a copy of the quickstart; yields (url, log)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    with running_lab(tmp_path, root) as (url, log_path):
        yield url, log_path


def test_quickstart_runs_and_a_generated_video_plays(lab):
    from playwright.sync_api import sync_playwright

    url, log_path = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            idle = run_all(page, url, NOTEBOOK.name)
            wait_all_ran(page, 400_000)
            idle.first.wait_for(timeout=60_000)
            assert cell_errors(page) == []

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
            assert newest.locator("img").count() == 0  # no thumbnail beside the playing video
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
