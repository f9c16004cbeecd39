"""`Job`: a future-like handle on one job. It holds the job id and the last state read, nothing else:
no Ray reference, so it outlives kernels and clients (`cluster.job(id)` re-attaches)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from mochi_lab.client.backend import Backend
from mochi_lab.config import ClientConfig
from mochi_lab.model import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobNotFound, JobRecord, check_job_id
from mochi_lab.params import GenerationParams, SubmitOptions

log = logging.getLogger(__name__)
LIVE_INTERVAL_S = 0.5  # how often a displayed job reads its state while it is queued or running
QUEUE_EVERY_S = 1.0  # how often a displayed queued job asks for its place in the queue
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
        """stage, step, total, fraction of denoising done, attempt and message, and as the worker
        measured them on this attempt: elapsed_s, eta_s, rate (steps/s) and preview_step (live)."""
        r = self.refresh()
        live = r.live or {}
        return {
            "stage": r.stage,
            "step": r.step,
            "total": r.total_steps,
            "fraction": r.step / r.total_steps if r.total_steps else (1.0 if r.status == DONE else 0.0),
            "attempt": r.attempts,
            "message": r.message,
            "elapsed_s": live.get("elapsed_s"),
            "eta_s": 0.0 if r.finished else live.get("eta_s"),
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
        view = (LiveView(self) if _in_kernel() else TextProgress()) if progress else None
        try:
            for r in self._backend.watch(self.id, timeout):
                self._record = r
                if view is not None:
                    view.update(r)
            return self._record
        finally:
            if view is not None:
                view.close()

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
        step. A job that finishes before its worker sees the request stays `done`: the answer is then
        "done", never a stale "running".
        """
        self._record = self._backend.cancel(self.id)
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
        options = SubmitOptions.parse(priority=priority, tags=[f"reproduces:{self.id}"])
        return Job(self._backend, self._backend.submit(self.params, options, reuse=False))

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
        """Display the job and keep the output live until the job ends (queued, the step, a lost worker,
        the place in the queue), then leave its last state as static HTML: prompt, status, timings, and
        for a done job its thumbnail and video (a copy beside the notebook, linked, never embedded)."""
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


def download_dir() -> Path:
    """Where a displayed done job's MP4 is copied for its link: relative to the kernel's cwd, which
    JupyterLab sets to the notebook's folder (the server can only serve files under its root)."""
    return ClientConfig.from_env().download_dir


def relative_href(path: Path) -> str | None:
    """A link to `path` relative to the kernel's cwd (the notebook's folder), percent-encoded so no
    name can become a scheme; JupyterLab resolves it against the notebook's folder and the server's
    base URL to the files/ route (a path above the server's root cannot be served: the link then
    fails and the poster stays). None when there is no relative path (another drive)."""
    try:
        rel = Path(os.path.relpath(path))
    except ValueError:
        return None
    return None if rel.is_absolute() else "./" + quote(rel.as_posix())


def media(job: "Job", folder: Path | None = None) -> dict[str, Any]:
    """A done job's media for its static view: a small thumbnail (data: URI) and its MP4, copied into
    `folder` beside the notebook and linked. Reads the backend; never raises (the view says what failed)."""
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


class LiveView:
    """A job's output in a notebook: HTML only, updated in place (a display id) while the job is queued
    or running, from an asyncio task on the kernel's event loop (never a thread), and left as static
    HTML once the job ends. HTML only, so a notebook saved and reopened without its kernel still shows
    each job's last state, where a widget would say "model not found".

    `publish(bundle, update)` sends a bundle (IPython's display machinery by default; tests pass a
    recorder); `step()` is one poll, which the task runs every `interval` seconds.
    """

    def __init__(self, job: Job, *, interval: float = LIVE_INTERVAL_S,
                 publish: Callable[[dict[str, Any], bool], None] | None = None, folder: Path | None = None):
        from mochi_lab.display.reprs import RetryTracker

        self.job = job
        self.record = job.record  # the state shown
        self.interval = interval
        self.tracker = RetryTracker()
        self.folder = folder
        self.position: dict[str, Any] | None = None
        self._position_at = -math.inf
        self.media: dict[str, Any] | None = None
        self.preview: dict[str, Any] | None = None  # the running job's latest preview, as an image
        self.gone = False
        self.html: str | None = None
        self._publish = publish
        self._handle = None
        self._task: asyncio.Task | None = None
        self.errors = 0

    @property
    def finished(self) -> bool:
        return self.gone or self.record.finished

    def bundle(self) -> dict[str, Any]:
        from mochi_lab.display.reprs import job_html, queue_note

        r = self.record
        notes = list(self.tracker.notes(r))
        if r.status == QUEUED and (line := queue_note(self.position)):
            notes.append(line)
        if self.gone:
            notes.append("deleted")
        return {"text/plain": _describe(r), "text/html": job_html(r, notes=notes, media=self.media,
                                                                   preview=self.preview)}

    def send(self, *, update: bool) -> None:
        bundle = self.bundle()
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

    def start(self) -> "LiveView":
        """Show the job as it is now, and keep it live if it has not ended (while a loop runs)."""
        try:
            self.observe(self.job.refresh())  # the state now, not the one read when the handle was made
        except JobNotFound:
            self.gone = True
        except Exception:  # the backend is unreachable: show the last state read
            self.observe(self.job.record)
        self.send(update=False)
        if not self.finished:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a plain script or terminal IPython): a snapshot
                return self
            self._task = loop.create_task(self._run(), name=f"mochi_lab job {self.job.id}")
        return self

    def observe(self, r: JobRecord) -> None:
        self.record = r
        self.tracker.observe(r)
        if r.status == QUEUED:
            now = time.monotonic()
            if now - self._position_at >= QUEUE_EVERY_S:
                self._position_at = now
                try:
                    self.position = self.job.queue_position()
                except Exception:  # a nicety: keep showing the job without it
                    self.position = None
        if r.status == DONE and self.media is None:
            self.media = media(self.job, self.folder)
        step = (r.live or {}).get("preview_step")
        if r.status != DONE and step is not None and (self.preview or {}).get("step") != step:
            from mochi_lab.display.reprs import preview_view

            try:
                self.preview = preview_view(step, self.job.preview) or self.preview
            except Exception:  # a nicety: the job shows without it
                pass

    def update(self, r: JobRecord) -> None:
        """Show a new state of the job (what `wait(progress=True)` calls for each state it sees)."""
        self.observe(r)
        self.send(update=self._handle is not None or self._publish is not None and self.html is not None)

    def step(self) -> bool:
        """One poll: read the job, redraw if it changed; returns whether it is still queued or running."""
        if self.finished:
            return False
        try:
            r = self.job.refresh()
            self.errors = 0
        except JobNotFound:  # deleted from another kernel or the history browser
            self.gone = True
            self.send(update=True)
            return False
        except Exception:  # keep polling through a brief store outage, but not forever
            self.errors += 1
            log.warning("job display poll failed (%d in a row)", self.errors, exc_info=True)
            return self.errors < 20
        self.update(r)
        return not self.finished

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.step():
                return

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class TextProgress:
    """`wait(progress=True)` outside a notebook: a text bar of the denoising steps that says when a
    worker was lost ("worker lost at decoding; retrying, attempt 2") and starts again, rather than
    freezing and then jumping back."""

    def __init__(self) -> None:
        from mochi_lab.display.reprs import RetryTracker

        self.tracker = RetryTracker()
        self.bar = None
        self._shown: tuple[Any, ...] | None = None
        self.lines: list[str] = []  # what was written above the bar (tests read it)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        self.lines.append(line)
        tqdm.write(line)  # above the bar, which redraws below it

    def update(self, r: JobRecord) -> None:
        from tqdm import tqdm

        for line in self.tracker.observe(r):
            self.write(line)
            if self.bar is not None:
                self.bar.reset(total=r.total_steps or self.bar.total)
                self._shown = None
        if self.bar is None and r.total_steps:
            # tqdm's own rate and ETA would time the polls, not the steps: the worker's figures are shown
            self.bar = tqdm(total=r.total_steps, desc="denoising", unit="step",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}{postfix}]")
        if self.bar is None:
            return
        n = r.total_steps if r.status == DONE else 0 if r.status == QUEUED else r.step
        postfix = r.stage if r.attempts <= 1 else f"{r.stage} · attempt {r.attempts}"
        live = r.live or {}
        if r.status == RUNNING and live.get("rate") and r.stage == "denoising":
            postfix += f" · {live['rate']:.2f} step/s"
        if r.status == RUNNING and live.get("eta_s") is not None:
            postfix += f" · ~{live['eta_s']:.0f} s left"
        if self.tracker.lease_expired_for is not None:
            postfix += f" · no heartbeat for {self.tracker.lease_expired_for:.0f} s"
        if self._shown != (n, postfix):
            self._shown = (n, postfix)
            self.bar.n = n
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()  # only on a change: a redraw per poll floods logs and notebooks

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
