"""Jobs and the Studio in a real JupyterLab, in headless Chromium, the way a researcher uses them.

The server runs under a JupyterHub-like base URL (/user/alice/) with the notebook in a subfolder, so
a link that ignores either lands on the wrong route. One notebook (written here) displays a job right
after submitting it, a Studio that generates one video, and a long job that a later cell cancels (the test
holds it at two steps first: tests/support/gate.py), and a job the test holds at its VAE decode.
Checked, with screenshots in artifacts/browser/ (ignored by git):

1. the download links (the Studio card's and the job output's) reach the files/ route: following
   one gives video/mp4 whose bytes decode (PyAV) as the MP4 with the job's frames;
2. a displayed job is live: its output moves from queued/running through the denoising steps to
   its end without re-running the cell, and a cancelled one says where it stopped;
3. progress covers the whole job: held at its decode (its worker has a pace from the done jobs before it),
   a displayed job's output shows elapsed time, an ETA that falls and a bar of the whole job that rises
   between two reads (the worker writes its figures again every 0.5 s while decoding); its Cancel button
   (in an output of its own) ends it "cancelled", and its output is then emptied;
4. saved (with the save hook enabled), and opened again without its kernel, the notebook shows each
   job's last state as static HTML (prompt, status, thumbnail, timings), no widget error, and no console
   error from mochi_lab's widgets.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.support.labkit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    cell_errors,
    notebook,
    run_all,
    running_lab,
    save_notebook,
    stop_sessions,
    wait_all_ran,
)

pytestmark = pytest.mark.usefixtures("chromium")

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
BASE = "/user/alice/"  # what JupyterHub puts in front of a single-user server's routes
FOLDER = "work"  # the notebook's folder under the server's root
NAME = "ux_jobs.ipynb"
TINY = "num_frames=7, height=32, width=64, num_inference_steps=2, fps=8"
# 200 steps (a preview every 20): the test's gates hold it at steps 20 and 40 while the page shows each
SLOW = "num_frames=7, height=32, width=64, num_inference_steps=200, fps=8"
SLOW_PROMPT = "ux-slow a long road"
STUDIO_PROMPT = "ux-studio a paper boat"
PREVIEW_MIN_INTERVAL_S = 0.3  # the lab's: several previews in a short job
CANCEL_NOW = "cancel-now"  # the test creates it (beside the notebook) once it has seen the slow job move
# Held at its decode. Its worker's pace is per pixel (worker/clock.py), learned on the tiny done jobs before it:
# 61x128x256 is 139 times their pixels, so the decode it expects lasts seconds even on a fast machine (the ETA
# falls while it is held), where the denoising of 2 steps of the tiny model stays cheap. It is cancelled
# before it decodes.
DECODE = "num_frames=61, height=128, width=256, num_inference_steps=2, fps=8"
DECODE_PROMPT = "ux-decode a harbour crane"
ETA = re.compile(r"ETA (\d+(?:\.\d+)?) (s|min)\b")
ELAPSED = re.compile(r"elapsed (\d+(?:\.\d+)?) (s|min)\b")


def cells(go: Path) -> list[str]:
    return [
        ("import asyncio, os\nfrom mochi_lab import MochiCluster\nfrom mochi_lab.display.widgets import Studio\n\n"
         "cluster = MochiCluster()"),
        f'job = cluster.generate("ux-job a lighthouse at dusk", seed=1, {TINY})\njob',
        f'studio = Studio(cluster, prompt="{STUDIO_PROMPT}", seed=2, {TINY})\nstudio',
        "studio.generate_button.click()\nawait studio.wait(timeout=300)",
        f'slow = cluster.generate("{SLOW_PROMPT}", seed=3, {SLOW})\nslow',
        # The slow job's output moves while this cell waits (the kernel free for the widgets); it is cancelled
        # mid-denoising when the test says so.
        (f"for _ in range(6000):\n    if os.path.exists({str(go)!r}) or slow.done():\n        break\n"
         "    await asyncio.sleep(0.1)\nslow.cancel()"),
        # queued behind the slow job; held at its decode until the test clicks its Cancel button
        f'held = cluster.generate("{DECODE_PROMPT}", seed=4, {DECODE})\nheld',
    ]




@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab under BASE with the save hook enabled; yields (url with BASE, root, log)."""
    tmp = tmp_path_factory.mktemp("ux-lab")
    root = tmp / "root"
    (root / FOLDER).mkdir(parents=True)
    (root / FOLDER / NAME).write_text(json.dumps(notebook(cells(root / FOLDER / CANCEL_NOW))))
    # the save hook: a saved notebook keeps the widgets' static stand-ins, not the live widgets
    hook = {"ServerApp": {"jpserver_extensions": {"mochi_lab.display.widgets.save_hook": True}}}
    env = {"MOCHI_LAB_PREVIEW_MIN_INTERVAL_S": str(PREVIEW_MIN_INTERVAL_S)}
    with running_lab(tmp, root, base_url=BASE, env=env, server_config=hook) as (url, log_path):
        yield url, root, log_path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def output_of(page, prompt: str):
    """The output area of the cell whose job has `prompt` (its live view, or its static one)."""
    return page.locator(".jp-Cell").filter(has=page.locator(".jp-OutputArea", has_text=prompt)).first


def seconds_in(pattern: re.Pattern, text: str) -> float | None:
    """The seconds a view shows after "ETA" or "elapsed" (None: not shown)."""
    m = pattern.search(text)
    return None if m is None else float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def decode(data: bytes, tmp: Path) -> int:
    """Frames in MP4 bytes, decoded with PyAV (raises when they are not an MP4)."""
    import av

    path = tmp / "downloaded.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        assert container.format.name.startswith("mov"), container.format.name
        return sum(1 for _ in container.decode(video=0))


FETCH = """async (href) => {
  const r = await fetch(href);
  const bytes = new Uint8Array(await r.arrayBuffer());
  return {status: r.status, type: r.headers.get('content-type'), bytes: Array.from(bytes)};
}"""


def follow(page, link, tmp: Path) -> tuple[str, int]:
    """Follow a download link as the page resolved it: its content type, and the frames its bytes decode to."""
    href = link.evaluate("a => a.href")
    assert f"{BASE}files/{FOLDER}/mochi_videos/" in href, href  # the server's files route, not /lab/tree
    got = page.evaluate(FETCH, href)
    assert got["status"] == 200, got["status"]
    with page.expect_download() as download:
        link.click()
    saved = Path(download.value.path())
    data = saved.read_bytes()
    assert data == bytes(got["bytes"])  # what the click saved is what the route serves
    return got["type"], decode(data, tmp)


def test_jobs_and_studio_live_links_and_a_reopened_notebook(lab, browser, hold, tmp_path):
    url, root, log_path = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    slow_gate = hold(SLOW_PROMPT, "denoising", step=20)
    decode_gate = hold(DECODE_PROMPT, "decoding", step=None)
    page = browser.new_page(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
    # every console error and uncaught exception in the page; none may come from mochi_lab's widgets
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    try:
        idle = run_all(page, url, f"{FOLDER}/{NAME}")

        # 2. live: the slow job's output shows its steps and its forming video while later cells run (held at
        # step 20, then at step 40, each previewed), then its end when the last cell cancels it
        slow = output_of(page, "ux-slow")
        slow.wait_for(timeout=400_000)
        steps: list[int] = []
        previews: list[str] = []  # the forming video's picture, replaced as the steps go on

        def watch_until(done, what: str) -> str:
            """Read the slow job's output until done() holds, recording each new step and picture; its text."""
            deadline = time.monotonic() + 300
            while True:
                # one read of the text and the picture: the output redraws between two reads, and its
                # picture goes once the job ends
                text, src = slow.locator(".jp-OutputArea").first.evaluate(
                    "el => [el.innerText, el.querySelector('img[alt=preview]')?.getAttribute('src') ?? null]")
                if src is not None and src not in previews:
                    previews.append(src)
                m = re.search(r"(\d+)/200", text)
                if m and (not steps or int(m.group(1)) != steps[-1]):
                    steps.append(int(m.group(1)))
                if done(text):
                    return text
                assert time.monotonic() < deadline, f"the slow job's output did not show {what}: {text!r}"
                time.sleep(0.2)

        slow_gate.wait_reached(timeout=400)
        reached = time.monotonic()
        watch_until(lambda text: steps[-1:] == [20] and len(previews) >= 1, "step 20 and its picture")
        # The kernel's worker previews at most once per PREVIEW_MIN_INTERVAL_S: once that has passed since step
        # 20's (a lower bound, whatever the machine's speed), the job moves on to step 40, previews it, is held.
        time.sleep(max(0.0, reached + PREVIEW_MIN_INTERVAL_S - time.monotonic()))
        hold(SLOW_PROMPT, "denoising", step=40).wait_reached()
        watch_until(lambda text: steps[-1:] == [40] and len(previews) >= 2, "step 40 and a new picture")
        (root / FOLDER / CANCEL_NOW).touch()  # the last cell cancels it
        slow_text = watch_until(lambda text: re.match(r"\s*(done|failed|cancelled)\b", text),  # the badge leads
                                "its end")
        wait_all_ran(page, 300_000)
        idle.first.wait_for(timeout=60_000)
        assert cell_errors(page) == []
        assert len(steps) >= 2 and steps == sorted(steps), steps  # it moved, forward only, with no re-run
        assert len(previews) >= 2 and all(p.startswith("data:image/webp;base64,") for p in previews), len(previews)
        assert "cancelled" in slow_text
        stopped = re.search(r"stopped at denoising step (\d+)/200", slow_text)
        assert stopped and int(stopped.group(1)) == 40, slow_text  # where it was held when cancelled

        # the job displayed right after submitting ended as done, with its video, without a re-run
        job = output_of(page, "ux-job")
        job.locator("video.mochi-video").wait_for(timeout=60_000)
        job_text = job.locator(".jp-OutputArea").inner_text()
        assert "done" in job_text and "total " in job_text and "queued" not in job_text
        page.wait_for_function("""() => [...document.querySelectorAll('video.mochi-video')]
            .every(v => v.readyState >= 2 && v.duration > 0)""", timeout=60_000, polling=500)

        # 1. the Studio card's download link, and the job output's: the MP4 itself from the files route
        studio = page.locator(".jp-OutputArea-output .mochi-studio")
        card = studio.locator(".mochi-job-card").first
        card.locator("video").wait_for(timeout=60_000)
        assert card.locator("img").count() == 0  # no thumbnail beside the playing video
        link = card.locator("a.mochi-download")
        ctype, frames = follow(page, link, tmp_path)
        assert ctype == "video/mp4" and frames == 7
        check_decoding_job(page, decode_gate)

        ctype, frames = follow(page, job.locator("a.mochi-download"), tmp_path)
        assert ctype == "video/mp4" and frames == 7
        studio.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "ux_studio_live.png"))

        # the Studio's form: a typed value out of range is an error next to its field, kept as typed
        guidance = studio.locator(".widget-inline-hbox", has_text="guidance").locator("input")
        guidance.fill("99")
        guidance.press("Enter")
        # named by the form's label, on whole words (a notebook's <pre> used to break them anywhere)
        error = studio.locator(".mochi-error", has_text="guidance: must be between 0.0 and 30.0, got 99.0")
        error.wait_for(timeout=30_000)
        assert guidance.input_value() == "99"  # not clamped to 30
        assert error.evaluate("e => getComputedStyle(e).wordBreak") == "normal"
        assert studio.locator("button", has_text="Generate").is_disabled()  # nothing to queue until it is fixed
        page.screenshot(path=str(ARTIFACTS / "ux_studio_field_error.png"))
        guidance.fill("4.5")
        guidance.press("Enter")
        error.wait_for(state="detached", timeout=30_000)

        # three jobs at once on the lab's one worker: the first held at step 20 (previewed), the waiting ones
        # say their place in the queue
        studio_gate = hold(STUDIO_PROMPT, "denoising", step=20)
        studio.locator("label", has_text="random seed").click()
        steps = studio.locator(".widget-inline-hbox", has_text="steps").locator("input")
        steps.fill("200")
        steps.press("Enter")
        generate = studio.locator("button", has_text=re.compile("Generate|Submitting"))
        for _ in range(3):
            generate.click()
            page.wait_for_function("""() => [...document.querySelectorAll('.mochi-studio button')]
                .some(b => b.textContent.includes('Generate') && !b.disabled)""", timeout=30_000)
        for place in ("1st", "2nd"):  # the two waiting cards, consistent with each other
            studio.locator(".mochi-note", has_text=f"{place} of 2 in the queue").first.wait_for(timeout=60_000)
        # a running card shows the video as it forms (the displayed slow job showed it changing, above)
        studio_gate.wait_reached()
        page.wait_for_function("""() => [...document.querySelectorAll('.mochi-studio .mochi-job-card img')]
            .some(i => i.offsetWidth > 0 && i.complete && i.naturalWidth > 0)""", timeout=120_000, polling=100)
        studio.locator(".mochi-job-card").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "ux_studio_queue.png"))
        studio_gate.release()
        page.wait_for_function("""() => [...document.querySelectorAll('.mochi-studio .mochi-job-card')]
            .filter(c => c.querySelector('video')).length >= 4""", timeout=300_000, polling=1000)
        slow.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "ux_job_outputs_live.png"))

        # 3. save; the file holds static HTML for every job, and no live widget of ours
        path = root / FOLDER / NAME
        saved = save_notebook(page, path)
        outputs = [o for c in saved["cells"] for o in c.get("outputs", [])]
        datas = [o.get("data", {}) for o in outputs]
        kinds = [(sorted(o.get("data", {})), o.get("metadata")) for o in outputs]
        # MochiCluster()'s start, the three jobs and the Studio's stand-in; each displayed job's Cancel button
        # left an empty output when its job ended
        assert sum(bool("".join(d.get("text/html", "")).strip()) for d in datas) == 5, kinds
        assert not any("application/vnd.jupyter.widget-view+json" in d for d in datas), "a live widget was saved"
        assert not any("application/vnd.mochi-lab.static+html" in d for d in datas)
        html = [("".join(d["text/html"]) if isinstance(d["text/html"], list) else d["text/html"])
                for d in datas if "text/html" in d]
        assert any("mochi-studio-static" in h and "ux-studio a paper boat" in h for h in html)
        assert path.stat().st_size < 400_000  # thumbnails are small; no video bytes in the file

        # ... opened again with its kernel gone: the last states, as HTML, and no widget error
        stop_sessions(url)
        page.goto(f"{url}/lab/tree/{FOLDER}/{NAME}", timeout=120_000)
        page.locator(".jp-OutputArea-output .mochi-job").first.wait_for(timeout=120_000)
        page.wait_for_timeout(3000)  # the widget manager gives up on missing models after ~2 s
        body = page.locator(".jp-Notebook").inner_text()
        assert "Error displaying widget" not in body and "model not found" not in body
        for prompt, status in (("ux-job a lighthouse", "done"), ("ux-studio a paper boat", "done"),
                               ("ux-slow a long road", "cancelled"), (DECODE_PROMPT, "cancelled")):
            view = page.locator(".jp-OutputArea-output .mochi-job", has_text=prompt).first
            text = view.inner_text()
            assert status in text and "total " in text, text
        done = page.locator(".jp-OutputArea-output .mochi-job", has_text="ux-studio a paper boat").first
        poster = done.locator("video").get_attribute("poster")
        assert poster and poster.startswith("data:image/jpeg;base64,")  # the thumbnail
        page.locator(".jp-OutputArea-output .mochi-studio-static").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "ux_reopened_without_kernel.png"), full_page=True)
        held = page.locator(".jp-OutputArea-output .mochi-job", has_text=DECODE_PROMPT).first
        assert "stopped after denoising (2/2 steps)" in held.inner_text()
        held.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "ux_reopened_decode_cancelled.png"))
        ours = [e for e in console if re.search(r"mochi|widget|Error setting state|model not found", e, re.I)]
        assert ours == [], ours
        print(f"console errors: {len(console)}, none from mochi_lab's widgets: {console[:5]}")
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "ux-failure.png"))
        print(log_path.read_text()[-4000:])
        print("console errors:", console)
        raise
    finally:
        page.close()


def check_decoding_job(page, gate) -> None:
    """The job held at its decode: elapsed time, and between two reads an ETA that falls and a bar that rises
    (the worker's ticks); then its Cancel button ends it "cancelled" and the button's output is emptied."""
    gate.wait_reached(timeout=300)
    cell = output_of(page, "ux-decode")
    view = cell.locator(".jp-OutputArea-output .mochi-job").first

    def read() -> tuple[str, float | None, float | None, float | None]:
        """The output's text, its ETA, elapsed time and bar (the fraction of the whole job), read in one go: the
        view redraws between two reads, and its bar goes once the job ends."""
        text, value = view.evaluate(
            "el => [el.innerText, el.querySelector('progress.mochi-bar')?.getAttribute('value') ?? null]")
        fraction = float(value) if value is not None else None
        return text, seconds_in(ETA, text), seconds_in(ELAPSED, text), fraction

    def wait_for(done, what: str) -> tuple[str, float | None, float | None, float | None]:
        deadline = time.monotonic() + 60
        while True:
            got = read()
            if done(*got):
                return got
            assert time.monotonic() < deadline, f"the held job's output did not show {what}: {got}"
            time.sleep(0.1)

    first = wait_for(lambda text, eta, elapsed, fraction: "decoding" in text and None not in (eta, elapsed, fraction),
                     "its decode with an ETA, elapsed time and a bar")
    _, eta0, elapsed0, fraction0 = first
    # the worker's next tick (every 0.5 s) and the view's next read: the decode it expects lasts seconds
    second = wait_for(lambda text, eta, elapsed, fraction: "decoding" in text and None not in (eta, elapsed, fraction)
                      and eta < eta0 and fraction > fraction0 and elapsed > elapsed0,
                      f"a later read (first: ETA {eta0} s, elapsed {elapsed0} s, bar {fraction0})")
    text = second[0]
    assert second[3] < 1 and not re.match(r"\s*(done|failed|cancelled)\b", text), text  # still running
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "ux_job_decoding_eta.png"))
    print(f"held at its decode: ETA {eta0} -> {second[1]} s, bar {fraction0} -> {second[3]}, "
          f"elapsed {elapsed0} -> {second[2]} s")

    # its Cancel button, in an output of its own below the job's: the job ends cancelled, the button goes
    button = cell.locator("button.mochi-job-cancel")
    assert button.count() == 1, cell.inner_html()[:2000]
    button.click()
    wait_for(lambda text, *_: re.match(r"\s*cancelled\b", text), "its end, cancelled")
    button.wait_for(state="detached", timeout=60_000)
    assert cell.locator(".jp-OutputArea-output .widget-button").count() == 0
    assert view.locator("video, a.mochi-download").count() == 0  # stopped before its MP4 was written
    text = view.inner_text()
    assert "stopped after denoising (2/2 steps), before its video was written" in text, text
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "ux_job_decoding_cancelled.png"))
