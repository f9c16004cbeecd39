"""`Job`: a future-like handle on one job. It holds the job id and the last state read, nothing else:
no Ray reference, so it outlives kernels and clients (`cluster.job(id)` re-attaches)."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from mochi_lab.client.backend import Backend
from mochi_lab.client.follow import LIVE, Cadence, Follower, follower_of
from mochi_lab.model import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobNotFound, JobRecord, check_job_id
from mochi_lab.params import GenerationParams

log = logging.getLogger(__name__)
LIVE_INTERVAL_S = LIVE.every_s  # how often a displayed job reads its state while it is queued or running
ESTIMATE_EVERY_S = 15.0  # how often the inputs of a queued job's wait estimate are read again
_LISTED = 1000  # queued jobs read to place one
_RECENT = 20  # done jobs read to estimate a queued job's wait


class JobFailed(RuntimeError):
    """The job failed; `.traceback` holds the worker's traceback."""

    def __init__(self, job_id: str, error: str, traceback: str = ""):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id, self.error, self.traceback = job_id, error, traceback


class JobCancelledError(RuntimeError):
    """The job was cancelled before it finished."""


class Job:
    """A job by id. Properties that say "live" read the backend; `record` and `repr` show the last state read."""

    def __init__(self, backend: Backend, record: JobRecord):
        self._backend = backend
        self._record = record

    # -- state -----------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._record.id

    @property
    def params(self) -> GenerationParams:
        """The params as submitted (resolved seed included); not re-validated."""
        return GenerationParams.stored(self._record.params)

    def refresh(self) -> JobRecord:
        """Read the job's current state (live)."""
        self._record = self._backend.get(self.id)
        return self._record

    @property
    def record(self) -> JobRecord:
        """The last state read, without I/O."""
        return self._record

    @property
    def status(self) -> str:
        """queued, running, done, failed or cancelled (live)."""
        return self.refresh().status

    @property
    def progress(self) -> dict[str, Any]:
        """stage, step, total, `fraction` of the whole job done (0..1: queue, load, text, denoise, decode and
        encode, each weighed by the time its worker expects it to take; see `display.reprs.progress_view`, which
        every view of a job shows), `label`, attempt and message, and as the worker measured them on this
        attempt: elapsed_s, eta_s (counting down through the decode and the encode), rate (steps/s) and
        preview_step (live)."""
        from mochi_lab.display.reprs import progress_view

        r = self.refresh()
        live = r.live or {}
        bar = progress_view(r)
        return {
            "stage": r.stage,
            "step": r.step,
            "total": r.total_steps,
            "fraction": bar["fraction"] or 0.0,
            "label": bar["label"],
            "attempt": r.attempts,
            "message": r.message,
            "elapsed_s": live.get("elapsed_s"),
            "eta_s": bar["eta_s"],
            "rate": live.get("rate"),
            "preview_step": live.get("preview_step"),
        }

    @property
    def preview(self) -> bytes | None:
        """The video as it forms: an animated WebP of the worker's latest preview (one picture per latent
        frame, 1/8 of the video's size), or None (not yet; or done, when the video replaces it) (live)."""
        found = self._backend.preview(self.id)
        return None if found is None else found[1]

    @property
    def timings(self) -> dict[str, float]:
        """Per-stage seconds: queue_s, load_s, text_s, denoise_s, decode_s, encode_s, run_s (live)."""
        return self.refresh().timings

    def done(self) -> bool:
        return self.refresh().finished

    # -- results ---------------------------------------------------------------
    def wait(self, timeout: float | None = None, *, progress: bool = False) -> JobRecord:
        """Block until the job finishes (or `timeout` seconds pass: TimeoutError).

        `progress`: in a notebook, the job's live summary (ending as its static summary); elsewhere a
        text bar. Both say when a worker was lost and the job is retried (the bar starts again)."""
        if self._record.finished:  # an ended job never changes again: nothing to read
            return self._record
        follower = self.follower
        view: LiveView | TextProgress | None = None
        if progress:
            # no Cancel button: a blocking wait holds the kernel, which could not act on its click
            view = LiveView(self, cancel=False) if _in_kernel() else TextProgress(follower)
        try:
            for r in follower.watch(self._backend, timeout):
                self._record = r
            return self._record
        finally:
            if view is not None:
                view.close()

    @property
    def follower(self) -> Follower:
        """The one follower of this job in this process, which every view of it reads (see `client.follow`)."""
        return follower_of(self)

    def result(self, timeout: float | None = None, *, progress: bool = False) -> Path:
        """Path of the MP4 on this machine, once done. Raises JobFailed (with the traceback) or JobCancelledError."""
        r = self.wait(timeout, progress=progress)
        if r.status == FAILED:
            raise JobFailed(self.id, r.error or "unknown error", r.traceback or "")
        if r.status == CANCELLED:
            raise JobCancelledError(f"job {self.id} was cancelled")
        return self._backend.artifact_path(self.id, "video")

    def cancel(self, timeout: float = 10.0) -> str:
        """Cancel, and return the job's state once it settles (within `timeout` s; 0: don't wait).

        A queued job is cancelled at once and never starts; a running one stops within one denoising
        step, or, asked while it decodes, before its MP4 is written. A job that finishes before its worker
        sees the request stays `done`: the answer is then "done", never a stale "running".
        """
        self._record = self._backend.cancel(self.id)
        follower = self.__dict__.get("_follower")
        if follower is not None:  # its views show the request now, not at their next read
            follower.observe(self._record)
        if not self._record.finished and timeout > 0:
            try:
                self.wait(timeout)
            except TimeoutError:
                pass
        return self._record.status

    def reproduce(self, *, priority: int = 0) -> "Job":
        """Queue the exact params again (same resolved seed and model), bypassing the result cache.

        On the same backend the new video's frames equal this one's; the new job is tagged
        `reproduces:<id>` so `cluster.jobs(tag=...)` finds every reproduction.
        """
        return Job(self._backend, self._backend.rerun(self.id, priority=priority))

    def save(self, path: str | Path, timeout: float | None = None) -> Path:
        """Copy the MP4 to `path` (a folder keeps the job's file name, `<id>.mp4`)."""
        self.result(timeout)
        dest = Path(path)
        if dest.is_dir():
            check_job_id(self.id)  # a stored id must not steer the file out of the folder
            dest = dest / f"{self.id}.mp4"
        dest.parent.mkdir(parents=True, exist_ok=True)
        return self._backend.save_artifact(self.id, "video", dest)

    @property
    def thumbnail(self) -> bytes | None:
        """The PNG thumbnail (middle frame) of a done job, else None."""
        if self._record.status != DONE:
            return None
        try:
            return self._backend.artifact(self.id, "thumbnail")
        except FileNotFoundError:
            return None

    @property
    def video(self):
        """The MP4 as an `ipywidgets.Video` (bytes go to the browser, never into the notebook file)."""
        from mochi_lab.display.reprs import video_widget

        if self._record.status != DONE:
            self.result(timeout=0)  # raises unless it has finished well since the last read
        p = self._record.params
        return video_widget(self._backend.artifact(self.id, "video"), p.get("width"), p.get("height"))

    def queue_position(self) -> dict[str, Any] | None:
        """Where this job stands in the cluster's queue (live), or None when it is not queued.

        `position` is its place among every account's queued jobs in the order workers take them (accounts
        in turn, each one's by priority then age); `queued` how many are queued in all (at most the first
        1000 are read). `eta_s`, when known, is from this account's recent run times of the same size and
        model and the `workers` that serve the model (None without a recent run to go by). Jobs queued
        later by an account that has waited longer may still go before it."""
        r = self.refresh()
        if r.status != QUEUED:
            return None
        rows = self._backend.queue(limit=_LISTED)
        position = next((row["position"] for row in rows if row.get("id") == r.id), None)
        if position is None:  # claimed since the refresh, or beyond the rows read
            return None if self.refresh().status != QUEUED else {"position": None, "queued": len(rows)}
        workers, durations = self._estimate_inputs(r)
        eta = None
        if durations and workers:
            eta = math.ceil(position / workers) * statistics.median(durations)
        return {"position": position, "queued": len(rows), "workers": workers, "eta_s": eta,
                "runs_measured": len(durations)}

    def _estimate_inputs(self, r: JobRecord) -> tuple[int | None, list[float]]:
        """The workers serving the job's model and recent run times of its shape, read at most every
        ESTIMATE_EVERY_S (a queued job's place is read often; these change slowly)."""
        cached = self.__dict__.get("_estimate")
        now = time.monotonic()
        if cached is not None and now - cached[0] < ESTIMATE_EVERY_S:
            return cached[1], cached[2]
        model = r.params.get("model") if isinstance(r.params, dict) else None
        try:
            workers = sum(1 for w in self._backend.workers() if not w.get("model") or w.get("model") == model)
        except Exception:  # the pool's rows are a nicety here
            workers = None
        durations = [t for t in (_run_s(j) for j in self._backend.list(status=DONE, limit=_RECENT)
                                 if _same_shape(j, r)) if t is not None]
        self.__dict__["_estimate"] = (now, workers, durations)
        return workers, durations

    # -- display ---------------------------------------------------------------
    def _repr_html_(self) -> str:
        """The last state read, as static HTML (no I/O: front ends without a kernel render this)."""
        from mochi_lab.display.reprs import job_html

        return job_html(self._record)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """text/plain and text/html of the last state read: plain HTML, so a saved notebook shows it
        without its kernel. IPython displays a job through `_ipython_display_` instead, which keeps it live."""
        from mochi_lab.display.reprs import job_html

        return {"text/plain": repr(self), "text/html": job_html(self._record)}

    def _ipython_display_(self) -> None:
        """Display the job and keep the output live until the job ends (queued, the stage and step, the whole
        job's bar, elapsed time and ETA, a lost worker, the place in the queue), with a Cancel button beside
        it meanwhile, then leave its last state as static HTML: prompt, status, timings, and for a done job its
        thumbnail and video (a copy beside the notebook, linked, never embedded)."""
        LiveView(self).start()

    def __repr__(self) -> str:
        return _describe(self._record)


def _describe(r: JobRecord) -> str:
    """A job's one-line text form (its repr, and the text/plain of its displays)."""
    step = f" {r.step}/{r.total_steps}" if r.total_steps else ""
    prompt = r.params.get("prompt", "") if isinstance(r.params, dict) else ""
    return f"<Job {r.id} {r.status} {r.stage}{step} prompt={str(prompt)[:40]!r}>"


_SHAPE = ("model", "width", "height", "num_frames", "num_inference_steps")


def _same_shape(a: JobRecord, b: JobRecord) -> bool:
    pa, pb = a.params if isinstance(a.params, dict) else {}, b.params if isinstance(b.params, dict) else {}
    return all(pa.get(k) == pb.get(k) for k in _SHAPE)


def _run_s(r: JobRecord) -> float | None:
    t = r.timings.get("run_s") if isinstance(r.timings, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 else None


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (a front end renders HTML and follows display ids)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


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
        return {"text/plain": _describe(r), "text/html": job_html(r, notes=notes, media=self.media,
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
        if self.control is not None or self._cancel is False or (publish is None and not _in_kernel()):
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
    """`wait(progress=True)` outside a notebook: a text bar of the whole job (`display.reprs.progress_view`, as
    every view of a job shows it: the stage, the denoising step, elapsed time and ETA, moving through the
    decode and the encode too) that says when a worker was lost ("worker lost at decoding; retrying, attempt
    2") and starts again, rather than freezing and then jumping back."""

    UNITS = 1000  # the bar's resolution: a thousandth of the job

    def __init__(self, follower: Follower | None = None) -> None:
        from mochi_lab.display.reprs import RetryTracker

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

        from mochi_lab.display.reprs import progress_view

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
