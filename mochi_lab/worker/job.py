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

from mochi_lab.adapters import AdapterNotFound, AdapterRejected, AdapterStore, adapter_file, read_adapter
from mochi_lab.logs import log_repeating
from mochi_lab.model import ARTIFACT_SUFFIXES, JobNotFound, LeaseLost, StoreError, artifact_path, remove_artifacts
from mochi_lab.params import GenerationParams, ParamsError, check_prompt_tokens
from mochi_lab.pipelines import JobCancelled
from mochi_lab.pipelines.preview import PreviewPlan, encode_strip
from mochi_lab.video import write_mp4, write_thumbnail
from mochi_lab.worker.clock import TICKING, JobClock, Pace
from mochi_lab.worker.provenance import model_revision
from mochi_lab.worker.telemetry import versions

if TYPE_CHECKING:
    import psutil

    from mochi_lab.config import WorkerConfig
    from mochi_lab.pipelines.lora import LoraCache
    from mochi_lab.store.base import Claim, Store
    from mochi_lab.worker.gate import Gates
    from mochi_lab.worker.telemetry import WorkerStats

log = logging.getLogger("mochi_lab.worker")

TICK_S = 0.5  # how often the figures are written again while a long call runs (JobClock: TICKING)
STOP_WAIT_S = 10.0  # the longest a job's end waits for a tick under way


class JobRejected(Exception):
    """A job that must fail at once, without a retry: its message is the job's error."""


def load_adapter(cache: LoraCache, settings: WorkerConfig, account: str, model: str, name: str, sha: str) -> float:
    """Load the account's adapter file of `sha` (named `name` in the job) into `cache`, the file checked again
    here (its sha256, then `read_adapter`'s checks); the seconds it took, 0.0 when it was loaded already. Every
    rank of a gang loads a job's adapters so, from the same content-addressed file. JobRejected naming the
    adapter when its file is gone or refused."""
    path = adapter_file(settings.artifacts_dir, account, sha)
    try:
        return cache.load(sha, lambda: read_adapter(
            path, sha, model=model, max_bytes=settings.max_adapter_bytes, max_rank=settings.max_adapter_rank,
            cache_dir=settings.cache_dir))
    except FileNotFoundError:
        raise JobRejected(f"lora: adapter {name!r} (sha256 {sha[:12]}) is gone: its file was removed after the "
                          "job was queued") from None
    except AdapterRejected as exc:
        raise JobRejected(f"lora: adapter {name!r} refused: {exc}") from None


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


class Reporter:
    """One job's progress writes: at each stage and step (`report`), and, from a thread of its own, again every
    TICK_S while a long call with no steps of its own runs (loading, the VAE decode, the MP4 encode), with the
    figures as they stand (JobClock), so the job's views keep counting elapsed time and ETA down through it.

    One write at a time: a tick never lands after the write of the stage that follows it. A tick that sees a
    cancel request marks the job's (`RunningJob.cancel_requested`); one that finds the lease lost marks it lost
    and stops ticking. `stop()` ends the thread; the job calls it before its finishing write, on every path."""

    def __init__(self, write: Callable[..., bool], running: RunningJob, clock: JobClock, total: int,
                 held: Callable[[str, int | None], None]) -> None:
        self._write, self.running, self.clock, self.total, self._held = write, running, clock, total, held
        self._lock = threading.Lock()
        self._message = ""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._tick_loop, daemon=True, name=f"mochi-ticker-{running.job_id}")

    def start(self) -> "Reporter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # a tick stuck in a hung store write must not hold the job's end: one that lands after the
            # finishing write is refused (LeaseLost) and ends there
            self._thread.join(STOP_WAIT_S)

    def report(self, stage: str, step: int | None = None, message: str = "") -> bool:
        """Write `stage` (and `step`) with the figures now; a test's gate may then hold the job here. True: a
        cancel was asked for."""
        with self._lock:
            self._message = message
            cancelled = self._write(stage=stage, step=step, total=self.total if step is not None else None,
                                    message=message, live=self.clock.live(stage, step))
        self._held(stage, step)
        return cancelled or self.running.cancel.is_set()

    def _tick_loop(self) -> None:
        while not self._stopped.wait(TICK_S):
            if self.clock.stage not in TICKING:
                continue
            try:
                with self._lock:
                    if self._stopped.is_set():
                        return
                    cancelled = self._write(stage=self.clock.stage, step=self.clock.step,
                                            total=self.total if self.clock.step is not None else None,
                                            message=self._message, live=self.clock.now())
                if cancelled:
                    self.running.cancel_requested()
            except LeaseLost:
                self.running.lost.set()
                return
            except Exception:  # a tick is a nicety: never let it end the job, nor die silently
                log_repeating(log, logging.WARNING, "progress tick failed", exc_info=True,
                              extra={"job_id": self.running.job_id})


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
    _pace: Pace

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

        reporter: Reporter | None = None

        def held(stage: str, step: int | None) -> None:
            """A test's gate may hold the job here."""
            self._gates.at(job.id, prompt, stage, step,
                           released=lambda: cancel.is_set() or lost.is_set() or self._stop.is_set(),
                           waiting=self._held)

        def write(**fields: Any) -> bool:
            return self._progress(job.id, token, **fields)

        try:
            params = self._admit(job)
            clock = JobClock(params, self._pace, claimed_mono, waited_s=claimed_at - job.created_at)
            reporter = Reporter(write, running, clock, params.num_inference_steps, held).start()
            # The first job after a load pays for the time it waited on it; later jobs pay 0 (warm).
            load_s = 0.0
            if params.model != self.model or self.runner is None:
                reporter.report("loading", message=f"loading {params.model}")
                self._load(params.model)
            self._check_prompt_tokens(params)
            if self._load_unpaid:
                load_s = max(0.0, min(self.runner.load_s, self.loaded_at - job.created_at))
                self._load_unpaid = False
            timings["queue_s"] = max(0.0, claimed_at - job.created_at - load_s)
            timings["load_s"] = load_s
            adapters = self._load_adapters(job, params, reporter, meta)
            reporter.report("denoising", 0)
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
                # after the last step the pipeline decodes the latents with the VAE (the reporter ticks on)
                stage = "decoding" if step == total else "denoising"
                if cancel.is_set() or reporter.report(stage, step):
                    raise JobCancelled(job.id)

            def on_preview(step: int, frames) -> None:
                if self._put_preview(job.id, token, step, encode_strip(frames)):
                    clock.preview_step = step

            every = self.settings.preview_every
            plan = None if every < 0 else PreviewPlan(on_preview, every, self.settings.preview_min_interval_s)
            with self.runner.lora.applied(adapters):  # disabled again after, on every path: the next job runs base
                result = self._generate(params, on_step, plan, adapters)
            timings.update(result.timings)
            # a cancel seen during the decode (the ticks read it) stops the job before the encode
            if lost.is_set():
                raise LeaseLost(f"job {job.id}: lease lost")
            if cancel.is_set() or reporter.report("encoding", params.num_inference_steps, message="writing MP4"):
                raise JobCancelled(job.id)
            t0 = time.perf_counter()
            # named by job id, so a retried job overwrites rather than adds files
            paths = self._artifact_paths(job)
            artifacts = {
                "video": str(write_mp4(result.frames, paths["video"], params.fps)),
                "thumbnail": str(write_thumbnail(result.frames, paths["thumbnail"])),
            }
            timings["encode_s"] = time.perf_counter() - t0
            reporter.stop()
            self._pace.learn(params, timings)
            timings["run_s"] = time.time() - claimed_at
            meta.update(result.info)
            meta.update(self._provenance(params), rss_before=rss_before, rss_after=self._proc.memory_info().rss,
                        gpu_allocated_before=gpu_before)
            if self._finish(running, "complete", lambda: self.store.complete(
                    job.id, token, artifacts=artifacts, timings=timings, meta=meta), extra):
                self.jobs_done += 1
                self.stats.job_finished(params.model, "done", timings, params.num_inference_steps)
                log.info("done in %.2fs", timings["run_s"], extra=extra)
        except LeaseLost:  # no finishing write to keep ticks from: the `finally` stops the reporter
            log.warning("lease lost; result dropped", extra=extra)
            self._drop_orphans(job)
        except Exception as exc:
            if reporter is not None:
                reporter.stop()  # no tick after the finishing write
            timings["run_s"] = time.time() - claimed_at
            if self._finish_badly(running, exc, timings, meta, extra):
                model = job.params.get("model") if isinstance(job.params, dict) else None
                outcome = "cancelled" if isinstance(exc, JobCancelled) else "failed"
                self.stats.job_finished(str(model), outcome, timings, 0)  # metrics bound the label
        finally:
            if reporter is not None:
                reporter.stop()
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

    def _load_adapters(self, job, params: GenerationParams, reporter: Reporter,
                       meta: dict[str, Any]) -> list[tuple[str, float]]:
        """The job's LoRA adapters loaded into the pipeline (the base model stays as it is), each file checked
        again here; (sha256, scale) of those to apply (a scale of 0 changes nothing: not even loaded). meta gets
        `lora` (name, sha256, scale and load_s of each) and `lora_load_s`. JobRejected naming the field when one
        cannot be used."""
        if not params.lora:
            return []
        s, cache = self.settings, self.runner.lora
        cache.size = s.lora_cache
        applied: list[tuple[str, float]] = []
        facts: list[dict[str, Any]] = []
        for ref in params.lora:
            sha = ref.sha256 or self._adapter_sha(job.account, ref.name)
            fact = {"name": ref.name, "sha256": sha, "scale": ref.scale, "load_s": 0.0}
            facts.append(fact)
            if ref.scale == 0.0:
                continue
            if sha not in cache.loaded:
                reporter.report("loading", message=f"loading adapter {ref.name}")
            fact["load_s"] = load_adapter(cache, s, job.account, params.model, ref.name, sha)
            applied.append((sha, ref.scale))
        cache.evict(keep=[sha for sha, _ in applied])
        meta.update(lora=facts, lora_load_s=sum(f["load_s"] for f in facts))
        return applied

    def _adapter_sha(self, account: str, name: str) -> str:
        """The sha256 of the account's adapter `name` now (for a job queued without one: not through a backend)."""
        s = self.settings
        try:
            return AdapterStore(s.artifacts_dir, account, max_bytes=s.max_adapter_bytes, max_rank=s.max_adapter_rank,
                                max_count=s.max_adapters).get(name)["sha256"]
        except AdapterNotFound:
            raise JobRejected(f"lora: no adapter named {name!r} in account {account}") from None

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
