"""The worker loop: load a pipeline once, then claim, generate, encode and complete jobs.

It runs inside a pool actor (see pool/driver.py) but knows nothing of Ray: it talks to the store and the
pipeline only, so it can also run in a plain process.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mochi_lab.config import Settings
from mochi_lab.logs import log_repeating
from mochi_lab.params import GenerationParams, ParamsError, check_prompt_tokens
from mochi_lab.pipelines import JobCancelled, PipelineConfig, load_runner
from mochi_lab.pipelines.preview import PreviewPlan, encode_strip
from mochi_lab.store import Claim, JobNotFound, LeaseLost, StoreError, open_store
from mochi_lab.store.base import ARTIFACT_SUFFIXES, artifact_path, remove_artifacts
from mochi_lab.version import __version__
from mochi_lab.video import write_mp4, write_thumbnail
from mochi_lab.worker.gate import Gates
from mochi_lab.worker.provenance import model_revision

log = logging.getLogger("mochi_lab.worker")


class _JobClock:
    """The live figures of one running attempt, from its own measured steps: elapsed_s, rate (steps/s,
    over the later half of the steps so far), eta_s (the steps left at that rate, plus decode and encode
    as long as this worker's past jobs took per pixel; left out until it has done one), and the last
    stored preview's step."""

    def __init__(self, params: GenerationParams, post_s_per_px: float | None, started: float):
        self.total = params.num_inference_steps
        self.pixels = params.num_frames * params.height * params.width
        self.post_s = None if post_s_per_px is None else post_s_per_px * self.pixels
        self.started = started  # monotonic, at the claim
        self.step_times: dict[int, float] = {}
        self.denoised: float | None = None
        self.preview_step: int | None = None

    def live(self, step: int) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {"elapsed_s": round(now - self.started, 3)}
        self.step_times.setdefault(step, now)
        rate = None
        if step >= 2:  # over the later half of the steps so far: it follows a machine that speeds up or
            since = max(1, step // 2)  # slows down, and skips the first step's warm-up
            rate = (step - since) / max(now - self.step_times.get(since, now), 1e-9)
        if step >= self.total and self.denoised is None:
            self.denoised = now
        if rate is not None:
            out["rate"] = round(rate, 3)
        left = None
        if self.denoised is not None:
            left = max(0.0, (self.post_s or 0.0) - (now - self.denoised)) if self.post_s is not None else None
        elif rate is not None:
            left = (self.total - step) / rate + (self.post_s or 0.0)
        if left is not None:
            out["eta_s"] = round(left, 3)
        if self.preview_step is not None:
            out["preview_step"] = self.preview_step
        return out

    def post_s_per_px(self, post_s: float, before: float | None) -> float:
        """This job's decode + encode time per pixel, averaged with the worker's past ones."""
        now = post_s / max(self.pixels, 1)
        return now if before is None else 0.5 * before + 0.5 * now


class JsonFormatter(logging.Formatter):
    """One JSON object a line; `extra={"job_id": ...}` lands as a field."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("job_id", "worker_id", "attempt"):
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def _gpu_facts() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_name": None, "gpu_memory_total": None}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu_name": props.name, "gpu_memory_total": props.total_memory}


class NvmlSampler:
    """This worker's GPU as NVML sees it (utilisation, device memory, power), for its row. Absent, not
    faked, where there is no GPU or no NVML: `sample()` is then {}."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml
            import torch

            if not torch.cuda.is_available():
                return
            pynvml.nvmlInit()
            uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
            # the device torch calls 0 is the one Ray gave this actor (CUDA_VISIBLE_DEVICES)
            self.handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None else
                           pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])))
            self.nvml = pynvml
        except Exception as exc:  # no driver, no library, an odd CUDA_VISIBLE_DEVICES: no GPU figures
            log.info("no NVML figures: %r", exc)
            self.handle = None

    def sample(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        nv, h = self.nvml, self.handle
        out: dict[str, float] = {}
        try:
            out["gpu_utilization"] = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out["gpu_device_memory_used"], out["gpu_device_memory_total"] = mem.used, mem.total
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception as exc:  # e.g. power not supported on this board: keep what was read
            log.debug("NVML read: %r", exc)
        return out


# Stage-time histograms kept by each worker and reported in its row (mochi_lab.pool.metrics exports them):
# upper bounds in seconds, from a tiny job's milliseconds to Genmo's reference video's minutes.
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STAGES = ("queue", "load", "text", "denoise", "decode", "encode")


class WorkerStats:
    """Cumulative figures of one worker's life (they restart from zero with it, as Prometheus counters
    do): jobs finished per model and outcome, stage-time histograms, denoising steps and seconds, the
    last job's steps per second, and store errors."""

    def __init__(self) -> None:
        self.finished: dict[str, dict[str, int]] = {}
        self.stages = {name: {"count": 0, "sum": 0.0, "buckets": [0] * len(STAGE_BUCKETS_S)} for name in STAGES}
        self.steps = 0
        self.denoise_s = 0.0
        self.rate: float | None = None
        self.store_errors = 0

    def job_finished(self, model: str, outcome: str, timings: dict[str, float], steps: int) -> None:
        by_model = self.finished.setdefault(model, {})
        by_model[outcome] = by_model.get(outcome, 0) + 1
        for name in STAGES:
            seconds = timings.get(f"{name}_s")
            if seconds is None:
                continue
            stage = self.stages[name]
            stage["count"] += 1
            stage["sum"] += seconds
            # each bucket counts its own observations, (previous bound, bound]; metrics accumulates them
            for i, bound in enumerate(STAGE_BUCKETS_S):
                if seconds <= bound:
                    stage["buckets"][i] += 1
                    break
        if outcome == "done" and timings.get("denoise_s"):
            self.steps += steps
            self.denoise_s += timings["denoise_s"]
            self.rate = steps / timings["denoise_s"]

    def to_dict(self) -> dict[str, Any]:
        return {"finished": self.finished, "stages": self.stages, "buckets": list(STAGE_BUCKETS_S),
                "steps": self.steps, "denoise_s": self.denoise_s, "rate": self.rate,
                "store_errors": self.store_errors}


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"mochi_lab": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


class JobRejected(Exception):
    """A job that must fail at once, without a retry: its message is the job's error."""


class WorkerUnhealthy(RuntimeError):
    """The worker loop is dead or wedged, or a job overran its bounds: restart the worker's process."""


class Backoff:
    """Bounded exponential backoff with jitter: base, 2*base, ... capped at `cap` seconds."""

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.n)
        self.n = min(self.n + 1, 30)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.n = 0


class Worker:
    """Loads `model` at start (state "loading"), then serves jobs from the store until stopped.

    The loop never dies of a store error: it backs off (bounded, with jitter) and resumes when the
    store is back. `check_health()` raises `WorkerUnhealthy` when the loop is dead or wedged, or when a
    job ignores a cancel for `cancel_grace_s` or runs past `max_run_s` (that job is then finished in the
    store first): the caller (the pool actor's watchdog) restarts the process.
    """

    def __init__(
        self,
        worker_id: str,
        settings: Settings,
        model: str = "tiny",
        config: PipelineConfig | None = None,
        facts: dict[str, Any] | None = None,
    ):
        self.worker_id = worker_id
        self.settings = settings
        self.model = model
        self.home_model = model  # the pool's model: a worker lent to another model's job comes back to it
        self.config = config or PipelineConfig()
        self.store = open_store(settings.store_url, max_attempts=settings.max_attempts)
        self.started_at = time.time()
        self.state = "loading"
        self.idle_since: float | None = None  # wall time this worker last became idle
        self.stats = WorkerStats()
        self._nvml: NvmlSampler | None = None
        self.current_job: str | None = None
        self.current_account: str | None = None  # whose job it is: who may see its id (backend.worker_rows)
        self.jobs_done = 0
        self.error: str | None = None
        self.runner = None
        self.loaded_at: float | None = None
        self._load_unpaid = False
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._facts: dict[str, Any] = {"node": socket.gethostname(), "pid": os.getpid(), **(facts or {})}
        self._thread: threading.Thread | None = None
        # liveness: the loop's last sign of progress (monotonic); the running job's bounds
        self.beat = time.monotonic()
        self._job: _RunningJob | None = None
        self._store_down_since: float | None = None
        self._store_skip_until = 0.0
        self._backoff_cap = settings.store_backoff_max_s
        # this worker's decode + encode seconds per output pixel (frames x height x width), for ETAs
        self._post_s_per_px: float | None = None
        self._gates = Gates(settings.test_gates)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"mochi-worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current job, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.store.remove_worker(self.worker_id)
        except StoreError:
            log.warning("could not remove the worker row", extra={"worker_id": self.worker_id})

    def run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.exception("worker loop died", extra={"worker_id": self.worker_id})
            raise

    def _serve(self) -> None:
        # A restarted worker (same id) takes back what its previous life held, so those jobs run
        # again now instead of a lease later.
        self._released = self._try_release_own_claims()
        try:
            self.publish()
            self._load(self.model)
        except Exception as exc:  # a worker that cannot load says so in its row, and serves nothing
            self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.exception("load failed", extra={"worker_id": self.worker_id})
            self.publish()
            return
        last_publish = 0.0
        idle, last_job = self.settings.poll_s, time.monotonic()
        backoff = Backoff(cap=self._backoff_cap)
        while not self._stop.is_set():
            self.beat = time.monotonic()
            try:
                if time.monotonic() - last_publish > self.settings.worker_ttl_s / 3:
                    self.publish()
                    last_publish = time.monotonic()
                if not self._released:  # the store was down when this worker started
                    self._release_own_claims()
                    self._released = True
                claim = self.store.claim(self.worker_id, self.settings.lease_s)
            except Exception as exc:  # StoreUnavailable above all; nothing may end the loop
                self._store_failed(exc, "claim")
                self._stop.wait(backoff.next())
                continue
            backoff.reset()
            self._store_back()
            if claim is None:
                if self.model != self.home_model:  # warm means warm for the pool's model: reload while idle
                    self._reload_home()
                    continue
                # Stay quick for a while after a job (sweeps and notebooks submit in bursts), then
                # back off: many idle workers must not keep a store, or a laptop, busy.
                self._stop.wait(idle)
                if time.monotonic() - last_job > self.settings.idle_after_s:
                    idle = min(idle * 2, self.settings.idle_poll_s)
                continue
            try:
                self.run_job(claim)
            except Exception:  # a bug in the job path must not end the loop either
                log.exception("job handling failed", extra={"worker_id": self.worker_id, "job_id": claim.job.id})
            idle, last_job = self.settings.poll_s, time.monotonic()
            last_publish = 0.0

    def _reload_home(self) -> None:
        try:
            self._load(self.home_model)
        except Exception as exc:  # the home model loaded once; if it no longer does, say so and keep serving
            self.error = f"reloading {self.home_model}: {type(exc).__name__}: {exc}"
            self.home_model = self.model  # stop retrying; the next job loads what it needs
            log.exception("could not reload the pool's model", extra={"worker_id": self.worker_id})

    def _try_release_own_claims(self) -> bool:
        try:
            self._release_own_claims()
            return True
        except StoreError as exc:
            self._store_failed(exc, "release claims")
            return False

    def _release_own_claims(self) -> None:
        released = self.store.release_worker(self.worker_id)
        if released:
            log.warning("took back %d job(s) of this worker's previous life: %s", len(released), released,
                        extra={"worker_id": self.worker_id})

    def _load(self, model: str) -> None:
        self.state = "loading"
        self.publish()
        self.runner = None  # drop the old pipeline before loading the next
        self.runner = self._make_runner(model)
        self.model = model
        self.loaded_at = time.time()
        self._load_unpaid = True
        self._facts.update(_gpu_facts())
        if self._nvml is None:
            self._nvml = NvmlSampler()
        # a load for a claimed job (another model) goes straight on to that job
        self.state, self.idle_since = ("busy", None) if self.current_job else ("idle", time.time())
        self.beat = time.monotonic()
        self.publish()
        log.info("loaded %s in %.2fs", model, self.runner.load_s, extra={"worker_id": self.worker_id})

    def _make_runner(self, model: str):
        """The loaded pipeline for `model` (a gang's leader also joins its peer here)."""
        return load_runner(model, self.settings.cache_dir, self.config)

    def _generate(self, params: GenerationParams, on_step: Callable[[int, int], None], plan: PreviewPlan | None):
        """One job's frames (a gang's leader runs its peer alongside)."""
        return self.runner.generate(params, on_step, preview=plan)

    # -- the store, across outages ------------------------------------------------
    def _store_failed(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        self.stats.store_errors += 1
        if self._store_down_since is None:
            self._store_down_since = now
            if isinstance(exc, StoreError):
                log_repeating(log, logging.WARNING, "store unavailable (%s): %s; backing off", what, exc,
                              extra={"worker_id": self.worker_id})
            else:
                log_repeating(log, logging.ERROR, "%s failed: %r; backing off", what, exc, exc_info=exc,
                              extra={"worker_id": self.worker_id})

    def _store_back(self) -> None:
        if self._store_down_since is not None:
            log_repeating(log, logging.INFO, "store back after %.1fs", time.monotonic() - self._store_down_since,
                          extra={"worker_id": self.worker_id})
            self._store_down_since = None

    def _with_store(self, write: Callable[[], Any], *, what: str, give_up: Callable[[], bool]) -> bool:
        """Run `write` until it succeeds (True), backing off while the store is unavailable. LeaseLost
        and JobNotFound propagate; `give_up()` ends the retries (False)."""
        backoff = Backoff(cap=self._backoff_cap)
        while True:
            try:
                write()
                self._store_back()
                return True
            except (LeaseLost, JobNotFound):
                raise
            except StoreError as exc:
                self._store_failed(exc, what)
                self.beat = time.monotonic()  # waiting out an outage is progress, not a wedge
                if give_up():
                    log.warning("gave up on %s: %s", what, exc, extra={"worker_id": self.worker_id})
                    return False
                self._stop.wait(backoff.next())

    def _progress(self, job_id: str, token: int, **fields: Any) -> bool:
        """A progress write that never stops the job: while the store is down it is skipped (for a
        backoff interval after each failure, so a hung store costs no step its timeout)."""
        now = time.monotonic()
        if now < self._store_skip_until:
            return False
        try:
            out = self.store.progress(job_id, token, **fields)
        except LeaseLost:
            raise
        except StoreError as exc:
            self._store_failed(exc, "progress")
            self._store_skip_until = time.monotonic() + min(self._backoff_cap, 1.0)
            return False
        self._store_back()
        return out

    def _held(self) -> None:
        self.beat = time.monotonic()  # a job a test holds is alive, not wedged

    def _put_preview(self, job_id: str, token: int, step: int, data: bytes) -> bool:
        """Like a progress write: a store outage skips the preview, never the job."""
        try:
            self.store.put_preview(job_id, token, step, data)
            return True
        except LeaseLost:
            raise
        except (StoreError, ValueError) as exc:
            log_repeating(log, logging.WARNING, "preview at step %d not stored: %s", step, exc, extra={"job_id": job_id})
            return False

    # -- one job ---------------------------------------------------------------
    def run_job(self, claim: Claim) -> None:
        job, token = claim.job, claim.token
        extra = {"job_id": job.id, "worker_id": self.worker_id, "attempt": job.attempts}
        claimed_at, claimed_mono = time.time(), time.monotonic()
        self.state, self.current_job, self.current_account = "busy", job.id, job.account
        running = self._job = _RunningJob(job.id, token, time.monotonic() + self.settings.lease_s)
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
            clock = _JobClock(params, self._post_s_per_px, claimed_mono)
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

    def _finish(self, running: "_RunningJob", what: str, write: Callable[[], Any], extra) -> bool:
        """A finishing write, retried across a store outage until the store takes it or refuses it
        (LeaseLost, raised to the caller). A stopping worker gives up once the lease has lapsed; the
        job then follows the expiry rules."""
        def give_up() -> bool:
            return self._stop.is_set() and time.monotonic() > running.lease_until

        landed = self._with_store(write, what=what, give_up=give_up)
        if not landed:
            log.warning("%s not recorded: the store stayed unavailable while stopping", what, extra=extra)
        return landed

    def _finish_badly(self, running: "_RunningJob", exc: Exception, timings, meta, extra) -> bool:
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

    def _heartbeat(self, running: "_RunningJob", finished: threading.Event) -> None:
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

    # -- health ------------------------------------------------------------------
    def check_health(self) -> dict[str, Any]:
        """Raise WorkerUnhealthy when this worker's process should be restarted: the loop thread died,
        the loop made no progress for `worker_stall_s`, or the running job ignored a cancel for
        `cancel_grace_s` or ran past `max_run_s` (then the job is first marked cancelled or failed, so
        it is not retried). Returns a summary otherwise."""
        now = time.monotonic()
        stall_s = self.settings.worker_stall_s
        grace_s = self.settings.cancel_grace_s
        max_run_s = self.settings.max_run_s
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set() and self.error is None:
            raise WorkerUnhealthy(f"worker {self.worker_id}: its loop thread is dead")
        running = self._job
        if running is not None:
            since_cancel = running.cancel_since and now - running.cancel_since
            if since_cancel and since_cancel > grace_s and running.stepped < running.cancel_since:
                self._abandon(running, "cancelled", f"ignored a cancel for {since_cancel:.1f} s")
                raise WorkerUnhealthy(f"worker {self.worker_id}: job {running.job_id} ignored a cancel "
                                      f"for {since_cancel:.1f} s (grace {grace_s:g} s)")
            if running.started and now - running.started > max_run_s + grace_s:
                self._abandon(running, "failed", f"exceeded max run time ({max_run_s:g} s)")
                raise WorkerUnhealthy(f"worker {self.worker_id}: job {running.job_id} exceeded max run time "
                                      f"({max_run_s:g} s)")
        if self.state in ("idle", "busy") and now - self.beat > stall_s:
            raise WorkerUnhealthy(f"worker {self.worker_id}: no progress for {now - self.beat:.0f} s "
                                  f"(state {self.state}, job {self.current_job})")
        return {"worker_id": self.worker_id, "state": self.state, "current_job": self.current_job,
                "since_progress_s": round(now - self.beat, 3)}

    def _abandon(self, running: "_RunningJob", status: str, why: str) -> None:
        """Finish a job this process will not finish itself (it is about to be restarted)."""
        running.lost.set()  # whatever the stuck job does later is dropped
        extra = {"job_id": running.job_id, "worker_id": self.worker_id}
        try:
            if status == "cancelled":
                self.store.finish_cancelled(running.job_id, running.token, meta={"worker_id": self.worker_id,
                                                                                  "note": why})
            else:
                self.store.fail(running.job_id, running.token, error=why, traceback="",
                                meta={"worker_id": self.worker_id})
            log.error("job %s: %s; restarting the worker", status, why, extra=extra)
        except StoreError as exc:  # the restart releases the claim anyway
            log.error("could not mark the job %s (%s): %s", status, why, exc, extra=extra)

    def _provenance(self, params: GenerationParams) -> dict[str, Any]:
        return {
            "model": params.model,
            "model_source": self.runner.source if params.model != "tiny" else "tiny (built in code)",
            "model_revision": model_revision(self.runner.source),
            "seed": params.seed,
            "versions": _versions(),
            "python": platform.python_version(),
        }

    # -- status ----------------------------------------------------------------
    def row(self) -> dict[str, Any]:
        mem = self.runner.memory_info() if self.runner is not None else {}
        return {
            "worker_id": self.worker_id,
            "node": self._facts.get("node_ip") or self._facts.get("node"),
            "node_id": self._facts.get("node_id"),
            "device": self._facts.get("device"),
            "gpu_name": self._facts.get("gpu_name"),
            "gpu_memory_used": mem.get("gpu_allocated_bytes"),
            "gpu_memory_total": self._facts.get("gpu_memory_total"),
            "rss_bytes": self._proc.memory_info().rss,
            # % of one core since the last row (a heartbeat ago); the first row's 0.0 means "not measured yet"
            "cpu_percent": self._proc.cpu_percent(None),
            "model": self.model if self.runner is not None else None,
            "state": self.state,
            "current_job": self.current_job,
            "current_account": self.current_account,
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
            "error": self.error,
            "pid": self._facts.get("pid"),
            "idle_since": self.idle_since if self.state == "idle" else None,
            "stats": self.stats.to_dict(),
            **(self._nvml.sample() if self._nvml is not None else {}),
        }

    def publish(self) -> None:
        try:
            self.store.put_worker(self.row(), self.settings.worker_ttl_s)
        except StoreError as exc:
            log_repeating(log, logging.WARNING, "could not publish the worker row: %s", exc,
                          extra={"worker_id": self.worker_id})


class _RunningJob:
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
