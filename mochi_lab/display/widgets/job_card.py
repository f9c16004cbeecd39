"""`JobCard`: one job's status, step progress, ETA and Cancel; its video and download link once done.

The status shows once (the badge); while the job waits, its place in the queue; while it runs, the
stage, step bar and ETA, and a line when a worker was lost and the job is retried; once it has ended,
the per-stage timings on one line, where a cancelled job stopped, the video (no thumbnail beside a
playing video) and a download link. A card can be collapsed, or cleared from its stack.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as W

from mochi_lab.display.links import download_dir as default_download_dir
from mochi_lab.display.links import relative_href
from mochi_lab.display.notes import RetryTracker
from mochi_lab.display.reprs import BORDER, thumbnail_uri, timings_line
from mochi_lab.model import CANCELLED, DONE, FAILED, QUEUED, JobNotFound

from ._format import error_html, job_view, render, seconds, to_float

if TYPE_CHECKING:
    from mochi_lab.client.follow import Follower
    from mochi_lab.client.job import Job
    from mochi_lab.model import JobRecord

BAR_STYLES = {DONE: "success", FAILED: "danger", CANCELLED: "warning"}


def finished(r: "JobRecord") -> bool:
    """Whether a record is done, failed or cancelled (whatever type a hostile record's status has)."""
    return isinstance(r.status, str) and r.status in BAR_STYLES


def download_href(path: Path) -> str | None:
    """The link to a saved file (`display.links.relative_href`): relative to the kernel's cwd, percent-encoded;
    None where the file has no relative path (another drive). JupyterLab's HTML renderer (an Output widget,
    or a text/html output) resolves it against the notebook's folder and the server's base URL to the
    files/ route, which serves the bytes as video/mp4."""
    return relative_href(Path(path))


def link_output(html: str, name: str) -> dict[str, Any]:
    """An Output widget's entry for a link: text/html, so the front end resolves its relative href."""
    return {"output_type": "display_data", "data": {"text/html": html, "text/plain": name}, "metadata": {}}


class JobCard(W.VBox):
    """A card for one job. `poll()` reads the job once and redraws; the owner decides when to call it.

    It reads nothing itself while the job runs: it draws what the job's `Follower` saw, shared with every
    other view of the job. It uses only the public `Job` handle: `record`, `refresh()`, `cancel()`,
    `queue_position()`, `preview`, and once done `video`, `thumbnail` (PNG bytes) and `save(folder)`.
    """

    def __init__(self, job: "Job", *, download_dir: Path | None = None,
                 on_clear: Callable[["JobCard"], None] | None = None):
        self.job = job
        self.download_dir = Path(download_dir) if download_dir else default_download_dir()
        self.on_clear = on_clear  # the stack removes the card; alone, clearing closes it
        self.follower: "Follower" = job.follower  # the one follower of this job, shared with its other views
        self.header = W.HTML(layout=W.Layout(flex="1 1 auto"))
        self.collapse_button = W.Button(icon="chevron-down", tooltip="collapse this card",
                                        layout=W.Layout(width="32px"))
        self.collapse_button.on_click(lambda _: self.toggle())
        self.clear_button = W.Button(icon="times", tooltip="remove this card (the job itself is not touched)",
                                     layout=W.Layout(width="32px"))
        self.clear_button.on_click(lambda _: self.clear())
        self.stage = W.HTML()
        # the whole job's fraction done, as every view of the job shows it (display.progress.progress_view)
        self.bar = W.FloatProgress(min=0.0, max=1.0, layout=W.Layout(width="240px"))
        self.eta = W.Label()
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="warning",
                                      layout=W.Layout(width="90px"))
        self.cancel_button.on_click(lambda _: self.cancel())
        self.progress_row = W.HBox([self.stage, self.bar, self.eta, self.cancel_button])
        self.notes = W.HTML()
        self.timings = W.HTML()
        self.error = W.HTML()
        self.result = W.HBox()
        # the video as it forms (the worker's latest preview), while the job runs; a cancelled job keeps it
        self.preview = W.Image(format="webp", width="288px", layout=W.Layout(display="none"))
        self.preview_step: int | None = None
        self.download = W.Output()  # the link, rendered by the front end's HTML renderer (see download_href)
        self.download_html = ""
        self.video: W.Video | None = None
        self.thumbnail: W.Image | None = None  # only when the video cannot be shown
        self.thumbnail_uri: str | None = None  # the static view's small thumbnail
        self.link: Path | None = None  # the saved MP4, relative to the kernel's cwd
        self.collapsed = False
        self.body = W.VBox([self.progress_row, self.notes, self.timings, self.error, self.preview, self.result])
        super().__init__(
            [W.HBox([self.header, self.collapse_button, self.clear_button]), self.body],
            layout=W.Layout(border=f"1px solid {BORDER}", padding="4px", margin="4px 0"),
        )
        self.add_class("mochi-job-card")
        self.update(self.follower.record)
        if self.follower.gone:
            self._gone()
        self.follower.listen(self._told)

    @property
    def record(self) -> "JobRecord":
        return self.job.record

    @property
    def tracker(self) -> RetryTracker:
        return self.follower.tracker

    @property
    def position(self) -> dict[str, Any] | None:
        return self.follower.position

    @property
    def gone(self) -> bool:
        return self.follower.gone

    @property
    def finished(self) -> bool:
        return finished(self.job.record)

    # -- actions ---------------------------------------------------------------
    def toggle(self) -> None:
        """Collapse the card to its header line, or open it again."""
        self.collapsed = not self.collapsed
        self.body.layout.display = "none" if self.collapsed else None
        self.collapse_button.icon = "chevron-right" if self.collapsed else "chevron-down"
        self.collapse_button.tooltip = "expand this card" if self.collapsed else "collapse this card"

    def clear(self) -> None:
        """Remove the card (its stack stops polling it); the job keeps running, and stays in History."""
        if self.on_clear is not None:
            self.on_clear(self)
        else:
            self.close()

    def poll(self) -> bool:
        """One read of the job by its follower (none while the follower's own task reads it for another
        view), redrawn through `_told`; returns whether it is still queued or running."""
        if self.finished or self.gone:
            return False
        if not self.follower.running:
            self.follower.step()
        return not (self.finished or self.gone)

    def _told(self, follower: "Follower") -> None:
        """The follower saw a new state (or that the job was deleted): draw it."""
        if self.comm is None:  # closed: nothing to draw on
            follower.unlisten(self._told)
            return
        if follower.gone:
            self._gone()
        else:
            self.update(follower.record)

    def replace_in_queue(self) -> None:
        """Ask for the job's place in the queue at the next read (another job was queued meanwhile)."""
        self.follower.replace_in_queue()

    def _gone(self) -> None:
        self.cancel_button.layout.display = "none"
        self.eta.value = "deleted"
        self.bar.bar_style = "danger"

    def close(self) -> None:
        self.follower.unlisten(self._told)
        super().close()

    def cancel(self) -> None:
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling"
        try:
            # timeout=0: ask and return; the poll task shows the job settle (a wait here would block the kernel)
            self.job.cancel(timeout=0)
        except JobNotFound:
            self.follower.gone = True
            self._gone()
            return
        self.update(self.job.record)

    # -- drawing ---------------------------------------------------------------
    def note_lines(self, r: "JobRecord") -> list[str]:
        return self.follower.notes()

    def update(self, r: "JobRecord", now: float | None = None) -> None:
        now = time.time() if now is None else now
        view = job_view(r, notes=self.note_lines(r))
        self.header.value = render("job_card.html", "header", r=view)
        bar = view["bar"]
        self.bar.value = bar["fraction"] or 0.0
        self.bar.bar_style = BAR_STYLES.get(r.status, "info") if isinstance(r.status, str) else "info"
        # while queued the badge says it all; the live row shows how long it has waited
        self.stage.value = "" if r.status == QUEUED else render("job_card.html", "stage", label=bar["label"])
        self.eta.value = self._eta_text(r, bar, now)
        self.notes.value = render("_macros.html", "notes", lines=view["notes"])
        self.timings.value = render("_macros.html", "timing_line", pairs=timings_line(r.timings)) if finished(r) else ""
        for part in (self.notes, self.timings):  # an empty line takes room too
            part.layout.display = None if part.value else "none"
        if finished(r):
            # the badge says the status; the row of live parts has nothing left to say
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancel"
            self.cancel_button.layout.display = "none"
            self.progress_row.layout.display = "none"
        elif r.cancel_requested:
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancelling"
        self._show_preview(r)
        if r.status == FAILED:
            self.error.value = error_html(r.error or "failed (no error recorded)", r.traceback)
        elif r.status == DONE and self.video is None:
            self._show_result()

    def _eta_text(self, r: "JobRecord", bar: dict[str, Any], now: float) -> str:
        if r.status == QUEUED:
            created = to_float(r.created_at)
            return "waiting" if created is None else f"waiting {seconds(now - created)}"
        if finished(r):
            return ""
        # measured by the worker on this job's own steps and its past jobs' pace: see Job.progress
        return bar["times"]

    def _show_preview(self, r: "JobRecord") -> None:
        if r.status == DONE:  # the video takes its place
            if self.preview in self.body.children:
                self.body.children = tuple(c for c in self.body.children if c is not self.preview)
                self.preview.close()
            return
        seen = self.follower.preview  # (step, WebP), read by the follower when the worker sent a new one
        if seen is None or seen[0] == self.preview_step:
            return
        self.preview_step, self.preview.value = seen
        self.preview.layout.display = None  # no tooltip: an Image has no description, see test_escaping

    def _show_result(self) -> None:
        try:
            thumb = self.job.thumbnail
        except Exception:  # a missing thumbnail is no reason to hide the video
            thumb = None
        self.thumbnail_uri = thumbnail_uri(thumb)
        parts: list[W.Widget] = []
        try:
            # Bytes travel to the browser over the widget comm; they are never written into the notebook.
            self.video = self.job.video
            parts.append(self.video)
        except Exception as exc:  # deleted since it finished, or the backend cannot serve it
            self.error.value = error_html(f"the video is gone: {type(exc).__name__}: {exc}")
            if thumb:  # the thumbnail stands in for the video that cannot play
                self.thumbnail = W.Image(value=bytes(thumb), format="png", width="96px")
                parts.append(self.thumbnail)
        try:
            # A copy beside the notebook, which the Jupyter server can serve (the artifact may not be local).
            self.download_dir.mkdir(parents=True, exist_ok=True)
            saved = Path(self.job.save(self.download_dir))
            href = download_href(saved)
            if href is None:  # no relative path (another drive): the page cannot link it
                parts.append(W.HTML(error_html(f"saved as {saved} (the page cannot link it)")))
            else:
                self.link = Path(os.path.relpath(saved))
                self.download_html = render("job_card.html", "download", href=href, name=saved.name)
                self.download.outputs = (link_output(self.download_html, saved.name),)
                parts.append(W.VBox([self.download], layout=W.Layout(margin="0 0 0 8px")))
        except Exception as exc:
            parts.append(W.HTML(error_html(f"no download link: {type(exc).__name__}: {exc}")))
        self.result.children = parts

    def static_html(self) -> str:
        """The card's last state as static HTML (for a notebook opened without its kernel): prompt,
        status, timings, notes, and once done the thumbnail, the video and the download link."""
        return render("job.html", r=self.static_view())

    def static_view(self) -> dict[str, Any]:
        """The facts `static_html` shows, as the plain view the templates escape."""
        r = self.job.record
        media = None
        if r.status == DONE:
            href = download_href(self.link) if self.link is not None else None
            media = {"thumbnail": self.thumbnail_uri, "href": href,
                     "name": self.link.name if self.link is not None else None, "video": self.link is not None}
        notes = [*self.note_lines(r), *(["deleted"] if self.gone else [])]
        return job_view(r, notes=notes, media=media)


__all__ = ["JobCard", "default_download_dir", "download_href"]
