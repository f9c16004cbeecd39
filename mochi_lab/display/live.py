"""The live views of one job: `LiveView`, a notebook cell's output kept live until the job ends (then left as
static HTML, a done job's video copied beside the notebook and linked: `media`), and `TextProgress`, the text
bar of `wait(progress=True)` outside a notebook. Both draw what the job's `Follower` (client/follow.py) saw;
`Output` is one cell output updated in place, which the run table's live view (client/run_table.py) uses too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from mochi_lab.client.follow import LIVE, Cadence, Follower, follower_of
from mochi_lab.client.job import Job, describe
from mochi_lab.display.startup import in_kernel
from mochi_lab.model import DONE, QUEUED, RUNNING, JobNotFound, JobRecord, check_job_id

LIVE_INTERVAL_S = LIVE.every_s  # how often a displayed job reads its state while it is queued or running


def media(job: "Job", folder: Path | None = None) -> dict[str, Any]:
    """A done job's media for its static view: a small thumbnail (data: URI) and its MP4, copied into
    `folder` beside the notebook and linked. Reads the backend; never raises (the view says what failed)."""
    from mochi_lab.display.links import download_dir, relative_href
    from mochi_lab.display.reprs import thumbnail_uri

    out: dict[str, Any] = {}
    try:
        out["thumbnail"] = thumbnail_uri(job.thumbnail)
    except Exception:  # a missing thumbnail is no reason to hide the rest
        out["thumbnail"] = None
    folder = download_dir() if folder is None else Path(folder)
    try:
        check_job_id(job.id)
        dest = folder / f"{job.id}.mp4"
        if not dest.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            dest = job.save(dest)
        out["name"] = dest.name
        out["href"] = relative_href(dest)
        if out["href"] is None:
            out["note"] = f"saved as {dest} (the page cannot link it)"
    except Exception as exc:  # deleted since it finished, or the backend cannot serve it
        out["note"] = f"no video: {type(exc).__name__}: {exc}"
        out["video"] = False
    return out


class Output:
    """One output of a notebook cell, updated in place (a display id): HTML only, so a notebook saved and
    reopened without its kernel shows the last state sent. `publish(bundle, update)` sends a bundle
    (IPython's display machinery by default; tests pass a recorder)."""

    def __init__(self, publish: Callable[[dict[str, Any], bool], None] | None = None):
        self._publish = publish
        self._handle = None
        self.html: str | None = None

    def send(self, bundle: dict[str, Any]) -> None:
        """Show `bundle` (text/plain and text/html): the first time as a new output, then in its place, and
        only when its HTML changed."""
        update = self.html is not None
        if update and bundle["text/html"] == self.html:
            return  # unchanged: nothing to send
        self.html = bundle["text/html"]
        if self._publish is not None:
            self._publish(bundle, update)
        elif update and self._handle is not None:
            self._handle.update(bundle, raw=True)
        else:
            from IPython.display import display

            self._handle = display(bundle, raw=True, display_id=True)


class LiveView:
    """A job's output in a notebook: HTML only, updated in place (a display id) while the job is queued
    or running (its stage and step, a bar of the whole job, elapsed time and ETA), and left as static HTML
    once the job ends. HTML only, so a notebook saved and reopened without its kernel still shows each job's
    last state, where a widget would say "model not found". Beside it, while the job runs, a Cancel button
    in an output of its own (`display.widgets.cancel.CancelControl`), replaced with nothing when the job ends.

    It reads nothing itself: it draws what the job's `Follower` saw (state, place in the queue, preview,
    notes), which an asyncio task on the kernel's event loop (never a thread) keeps reading, shared with
    any other view of the job. `publish(bundle, update)` sends a bundle (IPython's display machinery by
    default; tests pass a recorder); `step()` is one read; `interval` the follower's `Cadence`. `cancel`:
    whether to show the Cancel button (None: in a kernel with ipywidgets), or a `publish` for its output.
    """

    def __init__(self, job: Job, *, interval: float = LIVE_INTERVAL_S,
                 publish: Callable[[dict[str, Any], bool], None] | None = None, folder: Path | None = None,
                 cancel: bool | Callable[[dict[str, Any], bool], None] | None = None):
        self.job = job
        self._cancel = cancel
        self.control: Any = None  # the CancelControl while it is shown
        self.follower = follower_of(job)
        if interval != LIVE_INTERVAL_S:
            self.follower.cadence = Cadence(interval)
        self.interval = interval
        self.folder = folder
        self.media: dict[str, Any] | None = None
        self._preview: tuple[int, dict[str, Any] | None] | None = None  # (step, its image) as last drawn
        self.output = Output(publish)
        self._drawing = False
        self.follower.listen(self._draw)

    @property
    def record(self) -> JobRecord:
        """The state shown (the follower's)."""
        return self.follower.record

    @property
    def gone(self) -> bool:
        return self.follower.gone

    @property
    def finished(self) -> bool:
        return self.follower.finished

    @property
    def _task(self) -> asyncio.Task | None:
        return self.follower._task

    def preview(self) -> dict[str, Any] | None:
        """The running job's latest preview, as an image (None once done: the video replaces it)."""
        seen = self.follower.preview
        if self.record.status == DONE or seen is None:
            return None
        if self._preview is None or self._preview[0] != seen[0]:
            from mochi_lab.display.reprs import preview_view

            self._preview = (seen[0], preview_view(*seen))
        return self._preview[1]

    def bundle(self) -> dict[str, Any]:
        from mochi_lab.display.reprs import job_html

        r = self.record
        notes = [*self.follower.notes(), *(["deleted"] if self.gone else [])]
        return {"text/plain": describe(r), "text/html": job_html(r, notes=notes, media=self.media,
                                                                   preview=self.preview())}

    def send(self, *, update: bool = True) -> None:
        self.output.send(self.bundle())

    @property
    def html(self) -> str | None:
        """The HTML last sent (None: not shown yet)."""
        return self.output.html

    def _draw(self, follower: Follower) -> None:
        """What the follower tells: a new state. Sent only when the HTML changed; the last one stays."""
        if self._drawing:  # fetching the media reads the job again, which tells again
            return
        self._drawing = True
        try:
            if follower.record.status == DONE and self.media is None:
                self.media = media(self.job, self.folder)
            self.send()
        finally:
            self._drawing = False
        if follower.finished:
            follower.unlisten(self._draw)
            self._end_control()

    def start(self) -> "LiveView":
        """Show the job as it is now, and keep it live if it has not ended (while a loop runs)."""
        self.follower.listen(self._draw)
        self.follower.step()  # the state now, not the one read when the handle was made
        if self.html is None:  # nothing new to tell (ended, or the backend is unreachable): the last state read
            self._draw(self.follower)
        if not self.finished:
            self._show_control()
            self.follower.start()  # no loop (a plain script or terminal IPython): a snapshot
        return self

    def _show_control(self) -> None:
        """The Cancel button, below the job's HTML, where a front end can show it."""
        publish = self._cancel if callable(self._cancel) else None
        if self.control is not None or self._cancel is False or (publish is None and not in_kernel()):
            return
        try:
            from mochi_lab.display.widgets.cancel import CancelControl
        except ImportError:  # no ipywidgets (the thin client): the HTML alone, without a button
            return
        self.control = CancelControl(self._cancel_job, publish)
        self.control.show()

    def _cancel_job(self) -> None:
        try:
            self.job.cancel(timeout=0)  # ask and return: the follower shows it settle (a wait would block the kernel)
        except JobNotFound:
            self.follower.gone = True
            self._draw(self.follower)

    def _end_control(self) -> None:
        if self.control is not None:
            self.control.end()

    def update(self, r: JobRecord) -> None:
        """Show a new state of the job, read elsewhere."""
        self.follower.observe(r)

    def step(self) -> bool:
        """One read of the job (redrawn if it changed); returns whether it is still queued or running."""
        return self.follower.step()

    def close(self) -> None:
        self.follower.unlisten(self._draw)
        self._end_control()


class TextProgress:
    """`wait(progress=True)` outside a notebook: a text bar of the whole job (`display.progress.progress_view`, as
    every view of a job shows it: the stage, the denoising step, elapsed time and ETA, moving through the
    decode and the encode too) that says when a worker was lost ("worker lost at decoding; retrying, attempt
    2") and starts again, rather than freezing and then jumping back."""

    UNITS = 1000  # the bar's resolution: a thousandth of the job

    def __init__(self, follower: Follower | None = None) -> None:
        from mochi_lab.display.notes import RetryTracker

        self.tracker = RetryTracker()
        self.follower = follower  # told of each state the follower sees (`Job.wait`); else fed by `update`
        if follower is not None:
            follower.listen(self._told)
        self.bar = None
        self._shown: tuple[Any, ...] | None = None
        self.lines: list[str] = []  # what was written above the bar (tests read it)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        self.lines.append(line)
        tqdm.write(line)  # above the bar, which redraws below it

    def update(self, r: JobRecord) -> None:
        from tqdm import tqdm

        from mochi_lab.display.progress import progress_view

        for line in self.tracker.observe(r):
            self.write(line)
            if self.bar is not None:
                self.bar.reset(total=self.UNITS)
                self._shown = None
        if self.bar is None and r.status != QUEUED:
            # tqdm's own rate and ETA would time the polls, not the job: the worker's figures are shown, in the
            # `unit` field (tqdm puts ", " before a postfix)
            self.bar = tqdm(total=self.UNITS, bar_format="{desc} {percentage:3.0f}%|{bar}| {unit}")
        if self.bar is None:
            return
        bar = progress_view(r)
        label = bar["label"] if r.attempts <= 1 else f"{bar['label']} · attempt {r.attempts}"
        figures = [bar["times"]] if bar["times"] else []
        live = r.live or {}
        if r.status == RUNNING and live.get("rate") and r.stage == "denoising":
            figures.append(f"{live['rate']:.2f} step/s")
        if self.tracker.lease_expired_for is not None:
            figures.append(f"no heartbeat for {self.tracker.lease_expired_for:.0f} s")
        n, after = round((bar["fraction"] or 0.0) * self.UNITS), " · ".join(figures)
        if self._shown != (n, label, after):
            self._shown = (n, label, after)
            self.bar.n, self.bar.unit = n, after
            self.bar.set_description_str(label, refresh=False)
            self.bar.refresh()  # only on a change: a redraw per poll floods logs and notebooks

    def _told(self, follower: Follower) -> None:
        self.update(follower.record)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.unlisten(self._told)
        if self.bar is not None:
            self.bar.close()


__all__ = ["LIVE_INTERVAL_S", "LiveView", "Output", "TextProgress", "in_kernel", "media"]
