"""`Job`: a future-like handle on one stored job. It holds no Ray reference, only the job id."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from mochi_lab.params import GenerationParams
from mochi_lab.store import CANCELLED, DONE, FAILED, JobRecord, Store


class JobFailed(RuntimeError):
    """The job failed; `.traceback` holds the worker's traceback."""

    def __init__(self, job_id: str, error: str, traceback: str = ""):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id, self.error, self.traceback = job_id, error, traceback


class JobCancelledError(RuntimeError):
    """The job was cancelled before it finished."""


class Job:
    """A job by id. Properties that say "live" read the store; `repr` shows the last state read."""

    def __init__(self, store: Store, account: str, record: JobRecord):
        self._store = store
        self._account = account
        self._record = record

    # -- state -----------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._record.id

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(**self._record.params)

    def refresh(self) -> JobRecord:
        """Read the job from the store (live)."""
        self._record = self._store.get(self._account, self.id)
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
        """stage, step, total and fraction of denoising done (live)."""
        r = self.refresh()
        return {
            "stage": r.stage,
            "step": r.step,
            "total": r.total_steps,
            "fraction": r.step / r.total_steps if r.total_steps else (1.0 if r.status == DONE else 0.0),
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
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        delay = 0.05
        try:
            while True:
                r = self.refresh()
                if progress:
                    bar = _update_bar(bar, r)
                if r.finished:
                    return r
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} still {r.status} ({r.stage}) after {timeout}s")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.2)  # a store read is cheap; latency is not
        finally:
            if bar is not None:
                bar.close()

    def result(self, timeout: float | None = None, *, progress: bool = False) -> Path:
        """Path of the MP4, once done. Raises JobFailed (with the traceback) or JobCancelledError."""
        r = self.wait(timeout, progress=progress)
        if r.status == FAILED:
            raise JobFailed(self.id, r.error or "unknown error", r.traceback or "")
        if r.status == CANCELLED:
            raise JobCancelledError(f"job {self.id} was cancelled")
        return Path(r.artifacts["video"])

    def cancel(self) -> str:
        """Cancel: a queued job never starts; a running one stops within one denoising step."""
        self._record = self._store.cancel(self._account, self.id)
        return self._record.status

    def reproduce(self, *, priority: int = 0) -> "Job":
        """Queue the exact params again (same resolved seed and model), bypassing the result cache.

        On the same backend the new video's frames equal this one's; the new job is tagged
        `reproduces:<id>` so `cluster.jobs(tag=...)` finds every reproduction.
        """
        record = self._store.enqueue(self._account, dict(self._record.params), priority=priority,
                                     tags=[f"reproduces:{self.id}"])
        return Job(self._store, self._account, record)

    def save(self, path: str | Path, timeout: float | None = None) -> Path:
        """Copy the MP4 to `path` (a folder keeps the job's file name)."""
        src = self.result(timeout)
        dest = Path(path)
        if dest.is_dir():
            dest = dest / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    @property
    def thumbnail(self) -> Path | None:
        path = self._record.artifacts.get("thumbnail")
        return Path(path) if path else None

    @property
    def video(self):
        """The MP4 as an `ipywidgets.Video` (bytes go to the browser, never into the notebook file)."""
        from mochi_lab.reprs import video_widget

        self.result(timeout=0)  # raises unless done
        return video_widget(self._record)

    def _repr_html_(self) -> str:
        from mochi_lab.reprs import job_html

        return job_html(self._record)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        from mochi_lab.reprs import job_mimebundle  # a done job also offers its video as a widget

        return job_mimebundle(self)

    def __repr__(self) -> str:
        r = self._record
        step = f" {r.step}/{r.total_steps}" if r.total_steps else ""
        return f"<Job {r.id} {r.status} {r.stage}{step} prompt={r.params.get('prompt', '')[:40]!r}>"


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
