"""`JobCard`: one job's stage, step progress, ETA and Cancel; its video, thumbnail and link once done."""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import ipywidgets as W

from mochi_lab import CANCELLED, DONE, FAILED, QUEUED, JobNotFound
from mochi_lab.reprs import BORDER

from ._format import error_html, job_view, mapping, render, seconds, to_float, to_int

if TYPE_CHECKING:
    from mochi_lab import Job, JobRecord

BAR_STYLES = {DONE: "success", FAILED: "danger", CANCELLED: "warning"}


def finished(r: "JobRecord") -> bool:
    """Whether a record is done, failed or cancelled (whatever type a hostile record's status has)."""
    return isinstance(r.status, str) and r.status in BAR_STYLES


def default_download_dir() -> Path:
    """Where download links point: relative to the kernel's cwd, which JupyterLab sets to the notebook's folder."""
    return Path(os.environ.get("MOCHI_LAB_DOWNLOAD_DIR") or "mochi_videos")


def download_href(path: Path) -> str:
    """A relative URL for a file under the kernel's cwd: percent-encoded, so no name can become a scheme."""
    href = quote(Path(os.path.relpath(path)).as_posix())
    return href if href.startswith((".", "/")) else "./" + href


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
    """A card for one job. `poll()` reads the job once and redraws; the owner decides when to call it.

    It uses only the public `Job` handle: `record`, `refresh()`, `cancel()`, and once done `video`,
    `thumbnail` (PNG bytes) and `save(folder)` (works on every backend, local files or not).
    """

    def __init__(self, job: "Job", *, download_dir: Path | None = None):
        self.job = job
        self.download_dir = Path(download_dir) if download_dir else default_download_dir()
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
        self.link: Path | None = None  # the saved MP4, relative to the kernel's cwd
        self.gone = False
        super().__init__(
            [self.header, W.HBox([self.stage, self.bar, self.eta, self.cancel_button]), self.error, self.result],
            layout=W.Layout(border=f"1px solid {BORDER}", padding="4px", margin="4px 0"),
        )
        self.add_class("mochi-job-card")
        self.update(job.record)

    @property
    def record(self) -> "JobRecord":
        return self.job.record

    @property
    def finished(self) -> bool:
        return finished(self.job.record)

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
            # timeout=0: ask and return; the poll task shows the job settle (a wait here would block the kernel)
            self.job.cancel(timeout=0)
        except JobNotFound:
            self._gone()
            return
        self.update(self.job.record)

    def update(self, r: "JobRecord", now: float | None = None) -> None:
        now = time.time() if now is None else now
        view = job_view(r)
        self.header.value = render("job_card.html", "header", r=view)
        total = to_int(r.total_steps) or to_int(mapping(r.params).get("num_inference_steps")) or 1
        total = max(1, total)
        step = max(0, to_int(r.step, 0))
        self.bar.max = total
        self.bar.value = total if r.status == DONE else min(step, total)
        self.bar.bar_style = BAR_STYLES.get(r.status, "info") if isinstance(r.status, str) else "info"
        denoising = r.stage == "denoising"
        self.stage.value = render("job_card.html", "stage", stage=r.stage,
                                  step=r.step if denoising else None, total=total)
        self.eta.value = self._eta_text(r, step, total, now)
        if finished(r):
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancel"
            self.cancel_button.layout.display = "none"
        elif r.cancel_requested:
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancelling"
        if r.status == FAILED:
            self.error.value = error_html(r.error or "failed (no error recorded)", r.traceback)
        elif r.status == DONE and self.video is None:
            self._show_result()

    def _eta_text(self, r: "JobRecord", step: int, total: int, now: float) -> str:
        if r.status == QUEUED:
            created = to_float(r.created_at)
            return "queued" if created is None else f"queued {seconds(now - created)}"
        if finished(r):
            run = mapping(r.timings).get("run_s")
            return f"{r.status} in {seconds(run)}" if run is not None else str(r.status)
        if r.stage != "denoising":
            return f"{r.stage}…"
        if step >= total:
            return "decoding…"
        self.clock.observe(step, now)
        left = self.clock.eta(step, total, now)
        return "ETA …" if left is None else f"ETA {seconds(left)}"

    def _show_result(self) -> None:
        try:
            # Bytes travel to the browser over the widget comm; they are never written into the notebook.
            self.video = self.job.video
        except Exception as exc:  # deleted since it finished, or the backend cannot serve it
            self.error.value = error_html(f"the video is gone: {type(exc).__name__}: {exc}")
            return
        side: list[W.Widget] = []
        try:
            thumb = self.job.thumbnail
        except Exception:  # a missing thumbnail is no reason to hide the video
            thumb = None
        if thumb:
            self.thumbnail = W.Image(value=bytes(thumb), format="png", width="96px")
            side.append(self.thumbnail)
        try:
            # A copy beside the notebook, which the Jupyter server can serve (the artifact may not be local).
            self.download_dir.mkdir(parents=True, exist_ok=True)
            saved = Path(self.job.save(self.download_dir))
            self.link = Path(os.path.relpath(saved))
            side.append(W.HTML(render("job_card.html", "download", href=download_href(saved), name=saved.name)))
        except Exception as exc:
            side.append(W.HTML(error_html(f"no download link: {type(exc).__name__}: {exc}")))
        self.result.children = [self.video, W.VBox(side, layout=W.Layout(margin="0 0 0 8px"))]


__all__ = ["JobCard", "EtaClock", "default_download_dir", "download_href"]
