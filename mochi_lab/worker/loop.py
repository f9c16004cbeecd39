"""The worker loop: load a pipeline once, then claim jobs and run them (mochi_lab.worker.job), riding out
store outages; the health check its actor's watchdog calls; the row it publishes.

It runs inside a pool actor (see pool/actor.py) but knows nothing of Ray: it talks to the store and the
pipeline only, so it can also run in a plain process.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from mochi_lab._moved import moved_names
from mochi_lab.config import WorkerConfig
from mochi_lab.logs import log_repeating
from mochi_lab.model import JobNotFound, LeaseLost, StoreError
from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import PipelineConfig, load_runner
from mochi_lab.pipelines.preview import PreviewPlan
from mochi_lab.store import open_store
from mochi_lab.worker import telemetry
from mochi_lab.worker.clock import Pace
from mochi_lab.worker.gate import Gates
from mochi_lab.worker.job import JobRunner, RunningJob

log = logging.getLogger("mochi_lab.worker")

# The log format, the telemetry and the job's path that lived here have modules of their own; their old
# names here still answer for one release, with a DeprecationWarning.
__getattr__ = moved_names(__name__)


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


class Worker(JobRunner):
    """Loads `model` at start (state "loading"), then serves jobs from the store until stopped.

    The loop never dies of a store error: it backs off (bounded, with jitter) and resumes when the
    store is back. `check_health()` raises `WorkerUnhealthy` when the loop is dead or wedged, or when a
    job ignores a cancel for `cancel_grace_s` or runs past `max_run_s` (that job is then finished in the
    store first): the caller (the pool actor's watchdog) restarts the process.
    """

    def __init__(
        self,
        worker_id: str,
        settings: WorkerConfig,
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
        self.stats = telemetry.WorkerStats()
        self._nvml: telemetry.NvmlSampler | None = None
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
        self._job: RunningJob | None = None
        self._store_down_since: float | None = None
        self._store_skip_until = 0.0
        self._backoff_cap = settings.store_backoff_max_s
        # this worker's seconds per pixel and step of each stage on its past jobs, for ETAs (worker.clock)
        self._pace = Pace()
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
        self._facts.update(telemetry.gpu_facts())
        if self._nvml is None:
            self._nvml = telemetry.NvmlSampler()
        # a load for a claimed job (another model) goes straight on to that job
        self.state, self.idle_since = ("busy", None) if self.current_job else ("idle", time.time())
        self.beat = time.monotonic()
        self.publish()
        log.info("loaded %s in %.2fs", model, self.runner.load_s, extra={"worker_id": self.worker_id})

    def _make_runner(self, model: str):
        """The loaded pipeline for `model` (a gang's leader also joins its peer here)."""
        return load_runner(model, self.settings.cache_dir, self.config)

    def _generate(self, params: GenerationParams, on_step: Callable[[int, int], None], plan: PreviewPlan | None,
                  adapters: Sequence[tuple[str, float]] = ()):
        """One job's frames, with the LoRA `adapters` ((sha256, scale), applied by the caller here) set (a gang's
        leader runs its peers alongside, each applying the same)."""
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

    def _abandon(self, running: RunningJob, status: str, why: str) -> None:
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


