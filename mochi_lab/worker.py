"""The worker loop: load a pipeline once, then claim, generate, encode and complete jobs.

It runs inside a pool actor (see pool.py) but knows nothing of Ray: it talks to the store and the
pipeline only, so it can also run in a plain process.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import JobCancelled, PipelineConfig, load_runner
from mochi_lab.provenance import model_revision
from mochi_lab.settings import Settings
from mochi_lab.store import Claim, JobNotFound, LeaseLost, StoreError, open_store
from mochi_lab.store.base import remove_artifacts
from mochi_lab.video import write_mp4, write_thumbnail

log = logging.getLogger("mochi_lab.worker")


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


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    from mochi_lab import __version__

    return {"mochi_lab": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


class Worker:
    """Loads `model` at start (state "loading"), then serves jobs from the store until stopped."""

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
        self.config = config or PipelineConfig()
        self.store = open_store(settings.store_url, max_attempts=settings.max_attempts)
        self.started_at = time.time()
        self.state = "loading"
        self.current_job: str | None = None
        self.jobs_done = 0
        self.error: str | None = None
        self.runner = None
        self.loaded_at: float | None = None
        self._load_unpaid = False
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._facts: dict[str, Any] = {"node": socket.gethostname(), "pid": os.getpid(), **(facts or {})}
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"mochi-worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current job, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.remove_worker(self.worker_id)

    def run(self) -> None:
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
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_publish > self.settings.worker_ttl_s / 3:
                    self.publish()
                    last_publish = time.monotonic()
                claim = self.store.claim(self.worker_id, self.settings.lease_s)
            except StoreError:
                log.exception("store unavailable", extra={"worker_id": self.worker_id})
                self._stop.wait(1.0)
                continue
            if claim is None:
                # Stay quick for a while after a job (sweeps and notebooks submit in bursts), then
                # back off: many idle workers must not keep a store, or a laptop, busy.
                self._stop.wait(idle)
                if time.monotonic() - last_job > self.settings.idle_after_s:
                    idle = min(idle * 2, self.settings.idle_poll_s)
                continue
            self.run_job(claim)
            idle, last_job = self.settings.poll_s, time.monotonic()
            last_publish = 0.0

    def _load(self, model: str) -> None:
        self.state = "loading"
        self.publish()
        self.runner = None  # drop the old pipeline before loading the next
        self.runner = load_runner(model, self.settings.cache_dir, self.config)
        self.model = model
        self.loaded_at = time.time()
        self._load_unpaid = True
        self._facts.update(_gpu_facts())
        self.state = "idle"
        self.publish()
        log.info("loaded %s in %.2fs", model, self.runner.load_s, extra={"worker_id": self.worker_id})

    # -- one job ---------------------------------------------------------------
    def run_job(self, claim: Claim) -> None:
        job, token = claim.job, claim.token
        extra = {"job_id": job.id, "worker_id": self.worker_id, "attempt": job.attempts}
        claimed_at = time.time()
        self.state, self.current_job = "busy", job.id
        self.publish()
        log.info("claimed", extra=extra)
        cancel, lost, finished = threading.Event(), threading.Event(), threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, token, cancel, lost, finished), daemon=True)
        beat.start()
        timings: dict[str, float] = {}
        meta: dict[str, Any] = {"worker_id": self.worker_id, **self._facts}
        try:
            params = GenerationParams(**job.params)
            # The first job after a load pays for the time it waited on it; later jobs pay 0 (warm).
            load_s = 0.0
            if params.model != self.model:
                self.store.progress(job.id, token, stage="loading", message=f"loading {params.model}")
                self._load(params.model)
            if self._load_unpaid:
                load_s = max(0.0, min(self.runner.load_s, self.loaded_at - job.created_at))
                self._load_unpaid = False
            timings["queue_s"] = max(0.0, claimed_at - job.created_at - load_s)
            timings["load_s"] = load_s
            self.store.progress(job.id, token, stage="denoising", step=0, total=params.num_inference_steps)
            self.runner.reset_peak()
            rss_before = self._proc.memory_info().rss
            gpu_before = self.runner.memory_info().get("gpu_allocated_bytes")

            def on_step(step: int, total: int) -> None:
                if lost.is_set():
                    raise LeaseLost(f"job {job.id}: lease lost")
                # after the last step the pipeline decodes the latents with the VAE
                stage = "decoding" if step == total else "denoising"
                if cancel.is_set() or self.store.progress(job.id, token, stage=stage, step=step, total=total):
                    raise JobCancelled(job.id)

            result = self.runner.generate(params, on_step)
            timings.update(result.timings)
            self.store.progress(job.id, token, stage="encoding", message="writing MP4")
            t0 = time.perf_counter()
            # named by job id, so a retried job overwrites rather than adds files
            paths = self._artifact_paths(job)
            artifacts = {
                "video": str(write_mp4(result.frames, paths["video"], params.fps)),
                "thumbnail": str(write_thumbnail(result.frames, paths["thumbnail"])),
            }
            timings["encode_s"] = time.perf_counter() - t0
            timings["run_s"] = time.time() - claimed_at
            meta.update(result.info)
            meta.update(self._provenance(params), rss_before=rss_before, rss_after=self._proc.memory_info().rss,
                        gpu_allocated_before=gpu_before)
            self.store.complete(job.id, token, artifacts=artifacts, timings=timings, meta=meta)
            self.jobs_done += 1
            log.info("done in %.2fs", timings["run_s"], extra=extra)
        except LeaseLost:
            log.warning("lease lost; result dropped", extra=extra)
            self._drop_orphans(job)
        except Exception as exc:
            timings["run_s"] = time.time() - claimed_at
            self._finish_badly(job.id, token, exc, timings, meta, extra)
        finally:
            finished.set()
            beat.join()
            self.state, self.current_job = "idle", None
            self.publish()

    def _finish_badly(self, job_id: str, token: int, exc: Exception, timings, meta, extra) -> None:
        try:
            if isinstance(exc, JobCancelled):
                self.store.finish_cancelled(job_id, token, timings=timings, meta=meta)
                log.info("cancelled", extra=extra)
            else:
                tb = traceback.format_exc()
                self.store.fail(job_id, token, error=f"{type(exc).__name__}: {exc}", traceback=tb, timings=timings, meta=meta)
                log.error("failed: %s", exc, extra=extra)
        except LeaseLost:
            log.warning("lease lost while finishing", extra=extra)

    def _artifact_paths(self, job) -> dict[str, Path]:
        folder = self.settings.artifacts_dir / job.account
        return {"video": folder / f"{job.id}.mp4", "thumbnail": folder / f"{job.id}.png"}

    def _drop_orphans(self, job) -> None:
        """Files of a job deleted while it ran belong to nobody; a re-run's files keep the same names."""
        try:
            self.store.get(job.account, job.id)
        except JobNotFound:
            remove_artifacts({k: str(p) for k, p in self._artifact_paths(job).items()})
        except StoreError:
            pass

    def _heartbeat(self, job_id: str, token: int, cancel: threading.Event, lost: threading.Event, finished: threading.Event) -> None:
        while not finished.wait(self.settings.lease_s / 3):
            try:
                if self.store.heartbeat(job_id, token, self.settings.lease_s):
                    cancel.set()
            except LeaseLost:
                lost.set()
                return
            except StoreError:
                log.warning("heartbeat failed", extra={"job_id": job_id, "worker_id": self.worker_id})

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
            "model": self.model if self.runner is not None else None,
            "state": self.state,
            "current_job": self.current_job,
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
            "error": self.error,
        }

    def publish(self) -> None:
        try:
            self.store.put_worker(self.row(), self.settings.worker_ttl_s)
        except StoreError:
            log.warning("could not publish worker row", extra={"worker_id": self.worker_id})

