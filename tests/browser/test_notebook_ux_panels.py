"""History, experiments and the ClusterPanel in a real JupyterLab, in headless Chromium, as a researcher
uses them; plus the two quiet-notebook checks that need a kernel or Ray's logger but no browser.

One notebook (written here) starts the embedded default, makes a few jobs, a 2x2 experiment, and a long
job with two more queued behind it, then shows History, the experiment, its sweep list, its compare grid
and a ClusterPanel, and ends on a ParamsError. Checked in the page, with one screenshot per widget in
artifacts/browser/ (ignored by git):

- MochiCluster() prints nothing: Ray's start-up lines stay out of the notebook;
- ClusterPanel: "1 CPU worker", the running job by its prompt with a step bar, the queue in order;
- History: the "all" filter has its label, no button label is cut off, Play opens the player under the
  row played and Close removes it, a Re-run's card opens under the row it came from;
- the experiment and its sweep list: live tables with every run's status and "4/4 finished";
- the compare grid: row and column headers for prompt and seed, and one control plays, pauses and
  scrubs all four videos together;
- the ParamsError: its message in a short red block, no library traceback;
- MochiCluster() showed its start in the cell, step by step, to "ready", and its repr the live workers;
- saved and opened again without its kernel: History's last listing (thumbnails, the played video's link),
  the compare grid's posters linked to their videos, the panel's last state with its time; no "model not
  found" anywhere;
- not one console error in the page.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from tests.support.labkit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    notebook,
    run_all,
    running_lab,
    save_notebook,
    stop_sessions,
    wait_all_ran,
)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
AUTOPLAY = ["--autoplay-policy=no-user-gesture-required"]  # the synced grid plays without a click
NAME = "ux_panels.ipynb"
JOB_ID = re.compile(r"\b[0-9a-f]{11}-[0-9a-f]{12}\b")
BUSY_PROMPT = "ux-panel a very long take"  # held at denoising step 1 while the panel shows it
CELLS = [
    "from mochi_lab import MochiCluster\nfrom mochi_lab.display.widgets import ClusterPanel, History\n\n"
    "cluster = MochiCluster()\ncluster",
    'tiny = dict(num_frames=7, height=32, width=48, num_inference_steps=2, fps=8)\n'
    'jobs = [cluster.generate(f"ux-history {what}", seed=i, **tiny)\n'
    '        for i, what in enumerate(["a red ball", "a blue cube", "a green cone"])]\n'
    "for job in jobs:\n    job.result(timeout=300)\n"
    'history = History(cluster, text="ux-history")\nhistory',
    'exp = cluster.experiment("ux-grid", description="two prompts, two seeds")\n'
    'runs = exp.sweep(prompts=["a cat surfing", "a dog skating"], seeds=[1, 2], **tiny)\n'
    "exp.wait(timeout=300, progress=False)\nruns",
    "exp",
    "grid = exp.compare(width=192)\ngrid",
    # one worker: a job runs (the test holds it at step 1), two small ones wait behind it
    "import time\n"
    f"busy = cluster.generate({BUSY_PROMPT!r}, num_frames=7, height=32, width=48, num_inference_steps=200, fps=8)\n"
    "while busy.refresh().step < 1:\n    time.sleep(0.2)\n"
    'waiting = [cluster.generate(f"ux-panel waiting {i}", priority=i, **tiny) for i in range(2)]\n'
    "panel = ClusterPanel(cluster)\npanel",
    'cluster.generate("a cat", num_frames=84)',
]

VIDEOS_READY = """(root) => {
  const v = [...root.querySelectorAll('video')];
  return v.length > 0 && v.every(x => x.readyState >= 2 && x.duration > 0);
}"""
VIDEO_STATE = "root => [...root.querySelectorAll('video')].map(v => ({t: v.currentTime, paused: v.paused, d: v.duration}))"
SCRUB_TO_HALF = """(root) => {
  const s = root.querySelector('input.mochi-compare-scrub');
  s.value = '500';
  s.dispatchEvent(new Event('input', {bubbles: true}));
  s.dispatchEvent(new Event('change', {bubbles: true}));
}"""
CUT_OFF = """(root) => [...root.querySelectorAll('button')]
  .filter(b => b.offsetParent !== null && b.scrollWidth > b.clientWidth + 1)
  .map(b => b.textContent.trim())"""


def test_a_params_error_in_a_kernel_is_its_message_in_red():
    """IPython shows what `_render_traceback_` returns: the message in red, no frames of library code."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        'from mochi_lab import GenerationParams\nGenerationParams.parse("a cat", num_frames=84)')])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST")}
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute(env=env)
    (out,) = nb.cells[0].outputs
    assert (out.output_type, out.ename) == ("error", "ParamsError")
    (text,) = out.traceback  # one entry, where a plain exception shows ~20 frames of library code
    assert text.startswith("\x1b[31mParamsError\x1b[0m: ") and "79 or 85" in text
    assert "Traceback" not in text and ".py" not in text and text.count("\n") < 4


def test_ray_start_up_lines_are_held_back_unless_the_start_fails(monkeypatch):
    import ray

    from mochi_lab.config import Settings
    from mochi_lab.pool import connection as pool

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    seen = Seen()
    logger = logging.getLogger("ray")
    logger.addHandler(seen)  # beside Ray's own handler: what a notebook's stderr would get

    def starts(**kwargs):  # what ray.init logs on a good start
        logging.getLogger("ray").info("Started a local Ray instance.")
        logging.getLogger("ray._private.authentication").warning("Token authentication is enabled")

    def fails(**kwargs):
        logging.getLogger("ray").warning("the head node did not answer")
        raise ConnectionError("no Ray here")

    settings = Settings.from_env(ray_address="ray://127.0.0.1:1")  # a client address: nothing else is asked
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    try:
        monkeypatch.setattr(ray, "init", starts)
        assert pool.connect(settings) == "ray://127.0.0.1:1"
        assert seen.lines == []
        monkeypatch.setattr(ray, "init", fails)
        with pytest.raises(ConnectionError, match="no Ray here"):
            pool.connect(settings)
        assert seen.lines == ["the head node did not answer"]  # shown with the failure
        assert seen in logger.handlers and not any(isinstance(h, pool._HeldLogs) for h in logger.handlers)
        logging.getLogger("ray").warning("later")  # after the start, Ray's lines pass as before
        assert seen.lines[-1] == "later"
    finally:
        logger.removeHandler(seen)


# -- in JupyterLab -----------------------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path):
    """A private JupyterLab serving the panels notebook; yields (url, log)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / NAME).write_text(json.dumps(notebook(CELLS)))
    with running_lab(tmp_path, root, env={"MOCHI_LAB_DOWNLOAD_DIR": str(root / "videos")}) as (url, log_path):
        yield url, log_path, root


def output(page, index: int):
    """The output area of the index-th code cell."""
    return page.locator(".jp-CodeCell").nth(index).locator(".jp-OutputArea")


def shot(locator, name: str) -> None:
    locator.scroll_into_view_if_needed()
    locator.page.wait_for_timeout(400)  # let videos paint a frame
    locator.screenshot(path=str(ARTIFACTS / name))


@pytest.mark.usefixtures("chromium")
def test_history_experiments_and_cluster_panel_in_jupyterlab(lab, hold):
    from playwright.sync_api import sync_playwright

    url, log_path, root = lab
    hold(BUSY_PROMPT, "denoising", step=1)  # released when the test ends
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + AUTOPLAY, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []  # every console error and uncaught exception in the page: there must be none
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        try:
            idle = run_all(page, url, NAME)
            wait_all_ran(page, 500_000)
            idle.first.wait_for(timeout=60_000)

            # MochiCluster(): its start step by step to "ready", its repr the live workers, and not one line of Ray's
            first = output(page, 0)
            assert "MochiCluster" in first.inner_text()
            first.locator(".mochi-startup", has_text="ready").wait_for(timeout=120_000)
            steps = first.locator(".mochi-startup").inner_text()
            assert "opening the store" in steps and "starting Ray" in steps and "loading the model" in steps, steps
            # the repr, read as the handle was made: the workers live so far (none yet, or loading) and the queue
            repr_text = first.locator(".mochi-cluster").inner_text()
            assert re.search(r"workers \d+", repr_text) and "queue 0 jobs waiting" in repr_text, repr_text
            stderr = first.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert stderr.count() == 0, stderr.all_inner_texts()

            check_cluster_panel(page)
            check_history(page)
            check_experiment_tables(page)
            check_compare_grid(page)

            # the ParamsError: a short red block with the message, no library frames
            error = output(page, len(CELLS) - 1).locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            text = error.inner_text().strip()
            assert text.startswith("ParamsError: ") and "79 or 85" in text, text
            assert "Traceback" not in text and ".py" not in text and text.count("\n") < 4, text
            assert error.locator(".ansi-red-fg").count() == 1
            assert errors == [], errors

            check_reopened_without_kernel(page, url, root)
            assert errors == [], errors
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "ux-panels-failure.png"), full_page=True)
            print(log_path.read_text()[-4000:])
            raise
        finally:
            browser.close()


def check_cluster_panel(page) -> None:
    panel = output(page, 5).locator(".mochi-cluster-panel")
    # live: it redraws every 2 s while shown; wait for the long job's step bar and the two queued jobs
    panel.locator(".mochi-current-job progress").wait_for(timeout=60_000)
    assert "1 CPU worker" in panel.inner_text() and "GPU" not in panel.inner_text()
    current = panel.locator(".mochi-current-job").first.inner_text()
    assert "ux-panel a very long take" in current and re.search(r"denoising.*\d+/200", current), current
    queue = panel.locator(".mochi-queue tbody tr")
    assert queue.count() == 2
    rows = [queue.nth(i).inner_text() for i in range(2)]
    assert rows[0].startswith("1") and "ux-panel waiting 1" in rows[0]  # priority 1 starts first
    assert rows[1].startswith("2") and "ux-panel waiting 0" in rows[1] and "48x32 · 7 frames · 2 steps" in rows[1]
    shot(panel, "cluster_panel.png")


def check_history(page) -> None:
    history = output(page, 1).locator(".mochi-history")
    rows = history.locator(".mochi-history-row")
    assert rows.count() == 3
    assert history.locator("select").first.evaluate("s => s.options[s.selectedIndex].text") == "all"
    assert history.evaluate(CUT_OFF) == []  # every button shows its whole label
    # Play the middle row: the player opens under that row only
    rows.nth(1).locator("button", has_text="Play").click()
    rows.nth(1).locator(".mochi-history-detail video").wait_for(timeout=30_000)
    assert rows.nth(0).locator("video").count() == 0 and rows.nth(2).locator("video").count() == 0
    # Re-run the oldest row: the card opens under it (the new job's own row comes first in the list)
    source = rows.nth(2)
    source_id = JOB_ID.search(source.inner_text()).group()
    source.locator("button", has_text="Re-run").click()
    with_card = history.locator(".mochi-history-row:has(.mochi-job-card)")
    with_card.wait_for(timeout=30_000)
    assert rows.count() == 4 and with_card.count() == 1
    line = with_card.locator(".widget-hbox").first.inner_text()
    assert source_id in line and rows.nth(0).locator(".mochi-job-card").count() == 0
    assert history.locator(".mochi-history-player video").count() == 1  # the player stayed under its row
    assert history.evaluate(CUT_OFF) == []  # "Confirm"-sized labels too, with the player open
    shot(history, "history.png")
    history.locator(".mochi-history-player button", has_text="Close").click()
    page.wait_for_function("h => h.querySelectorAll('.mochi-history-player').length === 0",
                           arg=history.element_handle(), timeout=10_000)


def check_experiment_tables(page) -> None:
    sweep, exp = output(page, 2).locator(".mochi-experiment"), output(page, 3).locator(".mochi-experiment")
    for table in (sweep, exp):
        text = table.inner_text()
        assert "4/4 finished" in text and text.count("done") >= 4
        assert "a cat surfing" in text and "a dog skating" in text
    assert "Jobs of experiment ux-grid" in sweep.inner_text() and "two prompts, two seeds" in exp.inner_text()
    shot(exp, "experiment.png")


def check_compare_grid(page) -> None:
    grid = output(page, 4).locator(".mochi-compare")
    assert grid.locator("th.mochi-col").all_inner_texts() == ["1", "2"]
    assert grid.locator("th.mochi-row").all_inner_texts() == ["a cat surfing", "a dog skating"]
    corner = grid.locator("th.mochi-corner").inner_text()
    assert "prompt" in corner and "seed" in corner
    handle = grid.element_handle()
    page.wait_for_function(VIDEOS_READY, arg=handle, timeout=60_000)
    page.wait_for_timeout(1500)
    playing = grid.evaluate(VIDEO_STATE)
    assert len(playing) == 4 and not any(v["paused"] for v in playing), playing
    assert max(v["t"] for v in playing) - min(v["t"] for v in playing) < 0.2, playing  # in step
    grid.locator("button.mochi-compare-play").click()  # pause
    page.wait_for_timeout(300)
    paused = grid.evaluate(VIDEO_STATE)
    assert all(v["paused"] for v in paused) and max(v["t"] for v in paused) - min(v["t"] for v in paused) < 0.01
    grid.evaluate(SCRUB_TO_HALF)
    page.wait_for_timeout(300)
    scrubbed = grid.evaluate(VIDEO_STATE)
    half = scrubbed[0]["d"] / 2
    assert all(v["paused"] and abs(v["t"] - half) < 0.02 for v in scrubbed), scrubbed
    shot(grid, "compare.png")
    grid.locator("button.mochi-compare-play").click()  # play again, all together
    page.wait_for_timeout(600)
    again = grid.evaluate(VIDEO_STATE)
    assert not any(v["paused"] for v in again) and max(v["t"] for v in again) - min(v["t"] for v in again) < 0.2


def check_reopened_without_kernel(page, url: str, root: Path) -> None:
    """Save, end the kernel, open the notebook again: every widget shows its last state as HTML."""
    path = root / NAME
    datas = [o.get("data", {}) for c in save_notebook(page, path)["cells"] for o in c.get("outputs", [])]
    assert not any("application/vnd.jupyter.widget-view+json" in d for d in datas), "a live widget was saved"
    stop_sessions(url)
    page.goto(f"{url}/lab/tree/{NAME}", timeout=120_000)
    history = page.locator(".jp-OutputArea-output .mochi-history-static")
    history.wait_for(timeout=120_000)
    page.wait_for_timeout(3000)  # the widget manager gives up on missing models after ~2 s
    body = page.locator(".jp-Notebook").inner_text()
    assert "Error displaying widget" not in body and "model not found" not in body
    # History: the last listing, thumbnails, and the played row's link to its copy beside the notebook
    assert history.locator(".mochi-history-static-row").count() == 4 and "as listed at" in history.inner_text()
    assert history.locator("img").count() >= 3
    link = history.locator("a.mochi-download").first.get_attribute("href")
    assert served(link, root), link
    shot(history, "history_reopened.png")
    # the compare grid: four posters, each linked to its video; the synced play said to need the kernel
    grid = page.locator(".jp-OutputArea-output .mochi-compare-static")
    assert grid.locator("a.mochi-compare-link img").count() == 4
    assert "needs the kernel" in grid.inner_text()
    for href in grid.locator("a.mochi-compare-link").evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        assert served(href, root), href
    shot(grid, "compare_reopened.png")
    # the panel: its last state, with the time it was read
    panel = page.locator(".jp-OutputArea-output .mochi-cluster-panel-static")
    assert re.search(r"as read at \d\d:\d\d:\d\d", panel.inner_text()) and "1 CPU worker" in panel.inner_text()
    assert panel.locator(".mochi-queue").count() == 1
    shot(panel, "cluster_panel_reopened.png")


def served(href: str | None, root: Path) -> bool:
    """A link JupyterLab resolved to its files/ route (a relative ./videos/x.mp4 becomes
    <base>/files/videos/x.mp4?_xsrf=...), naming a copy that is beside the notebook."""
    match = re.search(r"/files/(videos/[^?#]+\.mp4)", href or "")
    return match is not None and (root / match.group(1)).is_file()
