"""`Job`: a future-like handle on one job. It holds the job id and the last state read, nothing else:
no Ray reference, so it outlives kernels and clients (`cluster.job(id)` re-attaches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mochi_lab.backend import Backend
from mochi_lab.params import GenerationParams, SubmitOptions
from mochi_lab.store.base import CANCELLED, DONE, FAILED, JobRecord, check_job_id



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
        """stage, step, total, fraction of denoising done, attempt and message (live)."""
        r = self.refresh()
        return {
            "stage": r.stage,
            "step": r.step,
            "total": r.total_steps,
            "fraction": r.step / r.total_steps if r.total_steps else (1.0 if r.status == DONE else 0.0),
            "attempt": r.attempts,
            "message": r.message,
        }

    @property
    def timings(self) -> dict[str, float]:
        """Per-stage seconds: queue_s, load_s, text_s, denoise_s, decode_s, encode_s, run_s (live)."""
        return self.refresh().timings

    def done(self) -> bool:
        return self.refresh().finished

    # -- results ---------------------------------------------------------------
    def wait(self, timeout: float | None = None, *, progress: bool = False) -> JobRecord:
        """Block until the job finishes (or `timeout` seconds pass: TimeoutError)."""
        bar = None
        try:
            for r in self._backend.watch(self.id, timeout):
                self._record = r
                if progress:
                    bar = _update_bar(bar, r)
            return self._record
        finally:
            if bar is not None:
                bar.close()

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
        from mochi_lab.reprs import video_widget

        if self._record.status != DONE:
            self.result(timeout=0)  # raises unless it has finished well since the last read
        p = self._record.params
        return video_widget(self._backend.artifact(self.id, "video"), p.get("width"), p.get("height"))

    def _repr_html_(self) -> str:
        from mochi_lab.reprs import job_html

        return job_html(self._record)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """text/plain and text/html always; a done job also offers its summary and video as one widget."""
        from mochi_lab.reprs import WIDGET_MIME, job_html, job_widget

        bundle: dict[str, Any] = {"text/plain": repr(self), "text/html": job_html(self._record)}
        if self._record.status == DONE:
            widget = self.__dict__.get("_widget")  # one widget per Job: re-displaying sends no new bytes
            if widget is None:
                try:
                    widget = self.__dict__["_widget"] = job_widget(self._record, self.video)
                except (FileNotFoundError, OSError):  # deleted since: the HTML summary still renders
                    return bundle
            # Only the widget reference: the widget's own text/plain would quote the MP4's first bytes.
            bundle[WIDGET_MIME] = widget._repr_mimebundle_()[WIDGET_MIME]
        return bundle

    def __repr__(self) -> str:
        r = self._record
        step = f" {r.step}/{r.total_steps}" if r.total_steps else ""
        return f"<Job {r.id} {r.status} {r.stage}{step} prompt={str(r.params.get('prompt', ''))[:40]!r}>"


def _update_bar(bar, r: JobRecord):
    from tqdm.auto import tqdm

    if bar is None and r.total_steps:
        bar = tqdm(total=r.total_steps, desc="denoising", unit="step")
    n = r.total_steps if r.status == DONE else r.step
    if bar is not None and (bar.n, bar.postfix) != (n, r.stage):
        bar.n = n
        bar.set_postfix_str(r.stage, refresh=False)
        bar.refresh()  # only on a change: a redraw per poll floods logs and notebooks
    return bar
