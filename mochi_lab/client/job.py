"""`Job`: a future-like handle on one job. It holds the job id and the last state read, nothing else:
no Ray reference, so it outlives kernels and clients (`cluster.job(id)` re-attaches)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mochi_lab._moved import moved_names
from mochi_lab.client.backend import Backend
from mochi_lab.client.follow import Follower, follower_of
from mochi_lab.model import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobRecord, check_job_id
from mochi_lab.params import GenerationParams
from mochi_lab.queue_eta import RECENT_RUNS, RUN_TIMES_EVERY_S, RunTimes, busy_for, queue_starts, run_times, serving

if TYPE_CHECKING:
    from mochi_lab.display.live import LiveView, TextProgress

log = logging.getLogger(__name__)
POOL_EVERY_S = 5.0  # how often a queued job's wait estimate reads the workers again (its place: at every ask)
_LISTED = 1000  # queued jobs read to place one, and running jobs read for their ETAs


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
        from mochi_lab.display.progress import progress_view

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
            from mochi_lab.display.live import LiveView, TextProgress, in_kernel

            # no Cancel button: a blocking wait holds the kernel, which could not act on its click
            view = LiveView(self, cancel=False) if in_kernel() else TextProgress(follower)
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
        1000 are read); `workers` how many workers serve its model (None where they could not be read).
        `eta_s` is when it should start, in seconds from now, as the cluster panel shows it
        (`mochi_lab.queue_eta.queue_starts`): each worker serving the model takes the next job as it frees up,
        an idle one now, a busy one when its job's ETA says (where that job is this account's), and each job
        ahead runs for the median of this account's recent run times of its shape (of all, for a shape not
        run lately), from the `runs_measured` runs read. None where there is nothing to go by: no worker for
        the model, or only busy ones whose jobs show no ETA. Jobs queued later by an account that has waited
        longer may still go before it."""
        r = self.refresh()
        if r.status != QUEUED:
            return None
        rows = self._backend.queue(limit=_LISTED)
        index = next((i for i, row in enumerate(rows) if row.get("id") == r.id), None)
        if index is None:  # claimed since the refresh, or beyond the rows read
            return None if self.refresh().status != QUEUED else {"position": None, "queued": len(rows)}
        workers, busy, times = self._estimate_inputs()
        eta = None if workers is None else queue_starts(rows[:index + 1], workers, busy, times)[-1]
        return {"position": rows[index]["position"], "queued": len(rows),
                "workers": None if workers is None else serving(workers, rows[index].get("model")),
                "eta_s": eta, "runs_measured": times.runs}

    def _estimate_inputs(self) -> tuple[list[Any] | None, dict[str, float], RunTimes]:
        """What the estimate goes by: the worker rows (None: not read), how long each busy one stays busy,
        and recent run times. A queued job's place is read often; the workers are read again at most every
        POOL_EVERY_S (a busy one's time left counting down meanwhile), the run times every RUN_TIMES_EVERY_S."""
        now = time.monotonic()
        pool = self.__dict__.get("_pool")
        if pool is None or now - pool[0] >= POOL_EVERY_S:
            pool = self.__dict__["_pool"] = (now, *self._read_pool())
        read_at, workers, busy = pool
        ran = self.__dict__.get("_run_times")
        if ran is None or now - ran[0] >= RUN_TIMES_EVERY_S:
            ran = self.__dict__["_run_times"] = (now, run_times(self._backend.list(status=DONE, limit=RECENT_RUNS)))
        return workers, {w: max(0.0, s - (now - read_at)) for w, s in busy.items()}, ran[1]

    def _read_pool(self) -> tuple[list[Any] | None, dict[str, float]]:
        try:
            workers = list(self._backend.workers())
        except Exception:  # the pool's rows are a nicety here
            return None, {}
        running: list[JobRecord] = []
        if any(isinstance(w, dict) and isinstance(w.get("current_job"), str) for w in workers):
            try:  # this account's running jobs: their ETAs say when their workers free up
                running = self._backend.list(status=RUNNING, limit=_LISTED)
            except Exception:
                pass
        return workers, busy_for(workers, running)

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
        from mochi_lab.display.live import LiveView

        LiveView(self).start()

    def __repr__(self) -> str:
        return describe(self._record)


def describe(r: JobRecord) -> str:
    """A job's one-line text form (its repr, and the text/plain of its displays)."""
    step = f" {r.step}/{r.total_steps}" if r.total_steps else ""
    prompt = r.params.get("prompt", "") if isinstance(r.params, dict) else ""
    return f"<Job {r.id} {r.status} {r.stage}{step} prompt={str(prompt)[:40]!r}>"


# The live views (Output, LiveView, TextProgress, media) had their home here (display/live.py).
__getattr__ = moved_names(__name__)
