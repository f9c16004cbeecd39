"""`JobCard`: one job's stage, step progress, ETA and Cancel; its video, thumbnail and link once done."""

from __future__ import annotations

import html
import os
import shutil
import time
from collections import deque
from pathlib import Path

import ipywidgets as W

from mochi_lab.job import Job
from mochi_lab.reprs import status_badge, video_widget
from mochi_lab.store import CANCELLED, DONE, FAILED, QUEUED, JobNotFound, JobRecord

from ._format import error_html, seconds, short, size

BAR_STYLES = {DONE: "success", FAILED: "danger", CANCELLED: "warning"}


def default_download_dir() -> Path:
    """Where download links point: relative to the kernel's cwd, which JupyterLab sets to the notebook's folder."""
    return Path(os.environ.get("MOCHI_LAB_DOWNLOAD_DIR") or "mochi_videos")


def link_video(video: Path, folder: Path) -> Path:
    """Put the MP4 where the Jupyter server can serve it: a hard link (no copy) or, across disks, a copy.

    The artifact store is usually outside the server's root, and a symlink out of the root is refused
    by the server, so the file itself must appear inside it. Returns the path relative to the cwd.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / video.name
    if not dest.exists():
        try:
            os.link(video, dest)
        except OSError:
            shutil.copyfile(video, dest)
    return Path(os.path.relpath(dest))


class EtaClock:
    """Estimates the time left in denoising from the step rate seen so far (steps are evenly priced)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=32)

    def observe(self, step: int, now: float) -> None:
        if not self._samples or self._samples[-1][1] != step:
            self._samples.append((now, step))

    def eta(self, step: int, total: int, now: float) -> float | None:
        if len(self._samples) < 2 or not total:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        rate = (s1 - s0) / (t1 - t0)
        return max(0.0, (total - step) / rate - (now - t1))


class JobCard(W.VBox):
    """A card for one job. `poll()` reads the job once and redraws; the owner decides when to call it."""

    def __init__(self, job: Job, *, download_dir: Path | None = None):
        self.job = job
        self.download_dir = download_dir or default_download_dir()
        self.clock = EtaClock()
        self.header = W.HTML()
        self.stage = W.HTML()
        self.bar = W.IntProgress(min=0, max=1, layout=W.Layout(width="240px"))  # update() sets the step count
        self.eta = W.Label()
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="warning",
                                      layout=W.Layout(width="90px"))
        self.cancel_button.on_click(lambda _: self.cancel())
        self.result = W.HBox()
        self.error = W.HTML()
        self.video: W.Video | None = None
        self.thumbnail: W.Image | None = None
        self.link: Path | None = None
        self.gone = False
        super().__init__(
            [self.header, W.HBox([self.stage, self.bar, self.eta, self.cancel_button]), self.error, self.result],
            layout=W.Layout(border="1px solid #ccc", padding="4px", margin="4px 0"),
        )
        self.add_class("mochi-job-card")
        self.update(job.record)

    @property
    def record(self) -> JobRecord:
        return self.job.record

    @property
    def finished(self) -> bool:
        return self.job.record.finished

    def poll(self) -> bool:
        """Read the job from the store and redraw; returns whether it is still queued or running."""
        if self.finished or self.gone:
            return False
        try:
            self.update(self.job.refresh())
        except JobNotFound:  # deleted from another kernel or the history browser
            self._gone()
        return not (self.finished or self.gone)

    def _gone(self) -> None:
        self.gone = True
        self.cancel_button.layout.display = "none"
        self.eta.value = "deleted"
        self.bar.bar_style = "danger"

    def cancel(self) -> None:
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling"
        try:
            self.job.cancel()
        except JobNotFound:
            self._gone()
            return
        self.update(self.job.record)

    def update(self, r: JobRecord, now: float | None = None) -> None:
        now = time.time() if now is None else now
        p = r.params
        self.header.value = (
            f"{status_badge(r.status)} <b>{html.escape(short(str(p.get('prompt', ''))))}</b>"
            f" <span style='color:#888;font-size:11px'>{html.escape(r.id)} · seed {p.get('seed')} · "
            f"{html.escape(size(p))} · {html.escape(str(p.get('model')))}</span>"
        )
        total = r.total_steps or int(p.get("num_inference_steps") or 1)
        self.bar.max = max(1, total)
        self.bar.value = total if r.status == DONE else min(r.step, total)
        self.bar.bar_style = BAR_STYLES.get(r.status, "info")
        steps = f" {r.step}/{total}" if r.stage == "denoising" else ""
        self.stage.value = f"<code>{html.escape(r.stage)}{steps}</code>"
        self.eta.value = self._eta_text(r, total, now)
        if r.finished:
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancel"
            self.cancel_button.layout.display = "none"
        elif r.cancel_requested:
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancelling"
        if r.status == FAILED:
            self.error.value = error_html(r.error or "failed (no error recorded)", r.traceback)
        elif r.status == DONE and self.video is None:
            self._show_result(r)

    def _eta_text(self, r: JobRecord, total: int, now: float) -> str:
        if r.status == QUEUED:
            return f"queued {seconds(now - r.created_at)}"
        if r.finished:
            run = r.timings.get("run_s")
            return f"{r.status} in {seconds(run)}" if run is not None else r.status
        if r.stage != "denoising":
            return f"{r.stage}…"
        if r.step >= total:
            return "decoding…"
        self.clock.observe(r.step, now)
        left = self.clock.eta(r.step, total, now)
        return "ETA …" if left is None else f"ETA {seconds(left)}"

    def _show_result(self, r: JobRecord) -> None:
        video = Path(r.artifacts["video"])
        try:
            # Bytes travel to the browser over the widget comm; they are never written into the notebook.
            self.video = video_widget(r)
        except OSError as exc:  # deleted since it finished
            self.error.value = error_html(f"the video is gone: {exc}")
            return
        side: list[W.Widget] = []
        thumb = r.artifacts.get("thumbnail")
        if thumb and Path(thumb).exists():
            self.thumbnail = W.Image.from_file(thumb, width="96px")
            side.append(self.thumbnail)
        self.link = link_video(video, self.download_dir)
        href = html.escape(self.link.as_posix())
        side.append(W.HTML(f'<a href="{href}" download="{html.escape(video.name)}">⬇ {html.escape(video.name)}</a>'))
        self.result.children = [self.video, W.VBox(side, layout=W.Layout(margin="0 0 0 8px"))]
