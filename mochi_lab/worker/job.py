"""One claimed job, start to finish: admit its params, load its model if need be, generate with progress
and previews, encode, and the finishing write; its lease's heartbeat meanwhile.

`JobRunner` is the part of `mochi_lab.worker.loop.Worker` that runs a job; the worker supplies the store,
the loaded pipeline and the store writes that ride out an outage (`_progress`, `_put_preview`, `_with_store`).
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mochi_lab.logs import log_repeating
from mochi_lab.model import ARTIFACT_SUFFIXES, JobNotFound, LeaseLost, StoreError, artifact_path, remove_artifacts
from mochi_lab.params import GenerationParams, ParamsError, check_prompt_tokens
from mochi_lab.pipelines import JobCancelled
from mochi_lab.pipelines.preview import PreviewPlan, encode_strip
from mochi_lab.video import write_mp4, write_thumbnail
from mochi_lab.worker.clock import JobClock
from mochi_lab.worker.provenance import model_revision
from mochi_lab.worker.telemetry import versions

if TYPE_CHECKING:
    import psutil

    from mochi_lab.config import WorkerConfig
    from mochi_lab.store.base import Claim, Store
    from mochi_lab.worker.gate import Gates
    from mochi_lab.worker.telemetry import WorkerStats

log = logging.getLogger("mochi_lab.worker")


class JobRejected(Exception):
    """A job that must fail at once, without a retry: its message is the job's error."""


class RunningJob:
    """What the loop, the heartbeat and the health check share about the job in hand."""

    def __init__(self, job_id: str, token: int, lease_until: float) -> None:
        self.job_id, self.token = job_id, token
        self.lease_until = lease_until  # monotonic: when the lease lapses unless renewed
        self.cancel, self.lost = threading.Event(), threading.Event()
        self.cancel_since: float | None = None  # when this worker first saw the cancel request
        self.started: float | None = None  # monotonic start of generation
        self.stepped = 0.0  # monotonic time of the last step

    def cancel_requested(self) -> None:
        if self.cancel_since is None:
            self.cancel_since = time.monotonic()
        self.cancel.set()


class JobRunner:
    """Runs one claimed job (`run_job`) and finishes it in the store: done, failed or cancelled."""

    # the worker's state (mochi_lab.worker.loop.Worker sets it); the worker's methods used here: publish,
    # _load, _generate, and the store writes that ride out an outage (_progress, _put_preview, _with_store, _held)
    worker_id: str
    settings: WorkerConfig
    store: Store
    runner: Any
    model: str
    state: str
    current_job: str | None
    current_account: str | None
    idle_since: float | None
    jobs_done: int
    loaded_at: float | None
    beat: float
    stats: WorkerStats
    _job: RunningJob | None
    _facts: dict[str, Any]
    _stop: threading.Event
    _proc: psutil.Process
    _gates: Gates
    _load_unpaid: bool
    _post_s_per_px: float | None

    def run_job(self, claim: Claim) -> None:
        job, token = claim.job, claim.token
        extra = {"job_id": job.id, "worker_id": self.worker_id, "attempt": job.attempts}
        claimed_at, claimed_mono = time.time(), time.monotonic()
        self.state, self.current_job, self.current_account = "busy", job.id, job.account
        running = self._job = RunningJob(job.id, token, time.monotonic() + self.settings.lease_s)
        self.publish()
        log.info("claimed", extra=extra)
        cancel, lost, finished = running.cancel, running.lost, threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(running, finished), daemon=True)
        beat.start()
        timings: dict[str, float] = {}
        meta: dict[str, Any] = {"worker_id": self.worker_id, **self._facts}
        max_run_s = self.settings.max_run_s
        prompt = str(job.params.get("prompt", "")) if isinstance(job.params, dict) else ""

        def progress(**fields: Any) -> bool:
            """Write progress (True: a cancel was asked for); a test's gate may hold the job here."""
            cancelled = self._progress(job.id, token, **fields)
            self._gates.at(job.id, prompt, fields["stage"], fields.get("step"),
                           released=lambda: cancel.is_set() or lost.is_set() or self._stop.is_set(),
                           waiting=self._held)
            return cancelled or cancel.is_set()

        try:
            params = self._admit(job)
            # The first job after a load pays for the time it waited on it; later jobs pay 0 (warm).
            load_s = 0.0
            if params.model != self.model or self.runner is None:
                progress(stage="loading", message=f"loading {params.model}")
                self._load(params.model)
            self._check_prompt_tokens(params)
            if self._load_unpaid:
                load_s = max(0.0, min(self.runner.load_s, self.loaded_at - job.created_at))
                self._load_unpaid = False
            timings["queue_s"] = max(0.0, claimed_at - job.created_at - load_s)
            timings["load_s"] = load_s
            clock = JobClock(params, self._post_s_per_px, claimed_mono)
            progress(stage="denoising", step=0, total=params.num_inference_steps, live=clock.live(0))
            self.runner.reset_peak()
            rss_before = self._proc.memory_info().rss
            gpu_before = self.runner.memory_info().get("gpu_allocated_bytes")
            running.started = time.monotonic()

            def on_step(step: int, total: int) -> None:
                self.beat = running.stepped = time.monotonic()
                if lost.is_set():
                    raise LeaseLost(f"job {job.id}: lease lost")
                if running.stepped - running.started > max_run_s:
                    raise JobRejected(f"exceeded max run time ({max_run_s:g} s)")
                # after the last step the pipeline decodes the latents with the VAE
                stage = "decoding" if step == total else "denoising"
                if cancel.is_set() or progress(stage=stage, step=step, total=total, live=clock.live(step)):
                    raise JobCancelled(job.id)

            def on_preview(step: int, frames) -> None:
                if self._put_preview(job.id, token, step, encode_strip(frames)):
                    clock.preview_step = step

            every = self.settings.preview_every
            plan = None if every < 0 else PreviewPlan(on_preview, every, self.settings.preview_min_interval_s)
            result = self._generate(params, on_step, plan)
            timings.update(result.timings)
            progress(stage="encoding", message="writing MP4", live=clock.live(params.num_inference_steps))
            t0 = time.perf_counter()
            # named by job id, so a retried job overwrites rather than adds files
            paths = self._artifact_paths(job)
            artifacts = {
                "video": str(write_mp4(result.frames, paths["video"], params.fps)),
                "thumbnail": str(write_thumbnail(result.frames, paths["thumbnail"])),
            }
            timings["encode_s"] = time.perf_counter() - t0
            self._post_s_per_px = clock.post_s_per_px(timings.get("decode_s", 0.0) + timings["encode_s"], self._post_s_per_px)
            timings["run_s"] = time.time() - claimed_at
            meta.update(result.info)
            meta.update(self._provenance(params), rss_before=rss_before, rss_after=self._proc.memory_info().rss,
                        gpu_allocated_before=gpu_before)
            if self._finish(running, "complete", lambda: self.store.complete(
                    job.id, token, artifacts=artifacts, timings=timings, meta=meta), extra):
                self.jobs_done += 1
                self.stats.job_finished(params.model, "done", timings, params.num_inference_steps)
                log.info("done in %.2fs", timings["run_s"], extra=extra)
        except LeaseLost:
            log.warning("lease lost; result dropped", extra=extra)
            self._drop_orphans(job)
        except Exception as exc:
            timings["run_s"] = time.time() - claimed_at
            if self._finish_badly(running, exc, timings, meta, extra):
                model = job.params.get("model") if isinstance(job.params, dict) else None
                outcome = "cancelled" if isinstance(exc, JobCancelled) else "failed"
                self.stats.job_finished(str(model), outcome, timings, 0)  # metrics bound the label
        finally:
            finished.set()
            beat.join()
            self._job = None
            self.state, self.current_job, self.current_account, self.idle_since = "idle", None, None, time.time()
            self.publish()

    def _admit(self, job) -> GenerationParams:
        """The store is a trust boundary for workers: validate the stored params once, at the claim."""
        try:
            return GenerationParams.parse(**job.params)
        except ParamsError as exc:
            raise JobRejected(str(exc)) from None
        except TypeError as exc:  # e.g. params that are not a mapping of names
            raise JobRejected(f"invalid generation parameters: {exc}") from None

    def _check_prompt_tokens(self, params: GenerationParams) -> None:
        """Prompt length by the loaded pipeline's own tokenizer, before any denoising."""
        try:
            check_prompt_tokens(params, self.runner.count_tokens)
        except ParamsError as exc:
            raise JobRejected(str(exc)) from None

    def _finish(self, running: RunningJob, what: str, write: Callable[[], Any], extra) -> bool:
        """A finishing write, retried across a store outage until the store takes it or refuses it
        (LeaseLost, raised to the caller). A stopping worker gives up once the lease has lapsed; the
        job then follows the expiry rules."""
        def give_up() -> bool:
            return self._stop.is_set() and time.monotonic() > running.lease_until

        landed = self._with_store(write, what=what, give_up=give_up)
        if not landed:
            log.warning("%s not recorded: the store stayed unavailable while stopping", what, extra=extra)
        return landed

    def _finish_badly(self, running: RunningJob, exc: Exception, timings, meta, extra) -> bool:
        """Record the job cancelled or failed; True when the store took it."""
        job_id, token = running.job_id, running.token
        try:
            if isinstance(exc, JobCancelled):
                landed = self._finish(running, "finish_cancelled",
                                      lambda: self.store.finish_cancelled(job_id, token, timings=timings, meta=meta), extra)
                log.info("cancelled", extra=extra)
            elif isinstance(exc, JobRejected):  # not retried: the same job would fail the same way
                landed = self._finish(running, "fail", lambda: self.store.fail(
                    job_id, token, error=str(exc), traceback="", timings=timings, meta=meta), extra)
                log.error("rejected: %s", exc, extra=extra)
            else:
                tb = "".join(traceback.format_exception(exc))
                landed = self._finish(running, "fail", lambda: self.store.fail(
                    job_id, token, error=f"{type(exc).__name__}: {exc}", traceback=tb, timings=timings, meta=meta),
                    extra)
                log.error("failed: %s", exc, extra=extra)
            return landed
        except (LeaseLost, JobNotFound):
            log.warning("lease lost while finishing", extra=extra)
            return False

    def _artifact_paths(self, job) -> dict[str, Path]:
        # derived from the account and the id inside the artifacts root (it refuses ids and accounts
        # that could leave it), never read back from the store
        return {name: artifact_path(self.settings.artifacts_dir, job.account, job.id, name) for name in ARTIFACT_SUFFIXES}

    def _drop_orphans(self, job) -> None:
        """Files of a job deleted while it ran belong to nobody; a re-run's files keep the same names."""
        try:
            self.store.get(job.account, job.id)
        except JobNotFound:
            remove_artifacts({k: str(p) for k, p in self._artifact_paths(job).items()})
        except StoreError:
            pass

    def _heartbeat(self, running: RunningJob, finished: threading.Event) -> None:
        while not finished.wait(self.settings.lease_s / 3):
            try:
                sent = time.monotonic()
                if self.store.heartbeat(running.job_id, running.token, self.settings.lease_s):
                    running.cancel_requested()
                running.lease_until = sent + self.settings.lease_s
                self.publish()  # the row outlives a long job, with its GPU figures fresh
            except LeaseLost:
                running.lost.set()
                return
            except StoreError as exc:
                log_repeating(log, logging.WARNING, "heartbeat failed: %s", exc,
                              extra={"job_id": running.job_id, "worker_id": self.worker_id})
            except Exception:  # never let the heartbeat die silently while the job runs
                log_repeating(log, logging.ERROR, "heartbeat error", exc_info=True,
                              extra={"job_id": running.job_id, "worker_id": self.worker_id})

    def _provenance(self, params: GenerationParams) -> dict[str, Any]:
        return {
            "model": params.model,
            "model_source": self.runner.source if params.model != "tiny" else "tiny (built in code)",
            "model_revision": model_revision(self.runner.source),
            "seed": params.seed,
            "versions": versions(),
            "python": platform.python_version(),
        }
