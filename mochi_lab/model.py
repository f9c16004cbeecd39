"""A job as every room sees it: its record, its statuses, its id, its artifact files, the errors about it and
its record as one flat table row; and when a pool's workers are ready, from their rows.

Plain data and checks only (no store, no Ray, no torch): the client, the display, the gateway, the pool,
the worker and the store backends all speak of jobs in these terms.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mochi_lab.config import check_account
from mochi_lab.params import GenerationParams

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = frozenset({DONE, FAILED, CANCELLED})


def check_status(status: str | None) -> None:
    """Reject an unknown status filter instead of silently matching nothing."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")


class StoreError(RuntimeError):
    """Base class of store errors."""


class JobNotFound(StoreError, KeyError):
    """No such job for this account (another account's job answers the same)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "job not found"


class LeaseLost(StoreError):
    """The caller's fencing token is no longer the job's owner: its write was rejected."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (connection refused, timed out)."""


class QuotaExceeded(RuntimeError):
    """This account is at one of its limits (a gateway answers 429); the message names which. Nothing was queued."""


class RecordTooLarge(ValueError):
    """A record over its size limit (a gateway answers 413); the message names the limit. Nothing was written."""


@dataclass
class JobRecord:
    """One job, as stored. `stage` is finer than `status` (loading, denoising, decoding, ...)."""

    id: str
    account: str
    params: dict[str, Any]
    status: str = QUEUED
    stage: str = QUEUED
    step: int = 0
    total_steps: int = 0
    message: str = ""
    # the running attempt's live figures, written with its progress: elapsed_s, eta_s, rate (steps/s), preview_step
    live: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    attempts: int = 0
    experiment: str | None = None
    tags: list[str] = field(default_factory=list)
    idempotency_key: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    lease_expires_at: float | None = None
    fence: int = 0
    cancel_requested: bool = False
    artifacts: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


TIMINGS = ("queue_s", "load_s", "text_s", "denoise_s", "decode_s", "encode_s", "run_s")  # a run's, in stage order
PARAM_COLUMNS = tuple(GenerationParams.model_fields)


def job_row(record: JobRecord) -> dict[str, Any]:
    """The record as one flat table row, the same columns for every job, in this order: id, status, stage, step,
    total_steps, each generation parameter, experiment, tags, attempts, priority, worker_id, the times
    (`*_at`, epoch seconds), each timing (`TIMINGS`), the artifacts' paths (video, thumbnail) and the error.
    None where a job has no value yet. Params, timings or artifacts that are not mappings (a record written
    by someone else than a worker) read as empty: a row is shown, never trusted."""
    params, timings, artifacts = (v if isinstance(v, dict) else {}
                                  for v in (record.params, record.timings, record.artifacts))
    return {
        "id": record.id, "status": record.status, "stage": record.stage, "step": record.step,
        "total_steps": record.total_steps,
        **{name: params.get(name) for name in PARAM_COLUMNS},
        "experiment": record.experiment, "tags": list(record.tags or ()), "attempts": record.attempts,
        "priority": record.priority, "worker_id": record.worker_id,
        "created_at": record.created_at, "started_at": record.started_at, "finished_at": record.finished_at,
        **{name: timings.get(name) for name in TIMINGS},
        "video": artifacts.get("video"), "thumbnail": artifacts.get("thumbnail"), "error": record.error,
    }


JOB_ID_RE = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{12}")


def new_job_id() -> str:
    # time-ordered prefix keeps ids sortable by creation; the random tail makes them unguessable
    return f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:12]}"


def check_job_id(job_id: str) -> str:
    """Raise ValueError unless `job_id` has the form new_job_id makes (ids name files)."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r:.80}")
    return job_id


ARTIFACT_SUFFIXES = {"video": ".mp4", "thumbnail": ".png"}


def artifact_path(root: Path, account: str, job_id: str, name: str) -> Path:
    """Where a job's artifact lives: derived from the account and the id, inside the artifacts root.

    Never read back from the store: a planted path must not decide what a delete removes."""
    return root / check_account(account) / f"{check_job_id(job_id)}{ARTIFACT_SUFFIXES[name]}"


def remove_artifacts(artifacts: dict[str, str]) -> None:
    for path in artifacts.values():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# -- a worker's row (`Store.workers`) --------------------------------------------
READY_STATES = frozenset({"idle", "busy"})  # its model loaded: it serves jobs


def workers_ready(rows: Iterable[Mapping[str, Any]], processes: Mapping[str, int | None] | None = None) -> bool:
    """Whether a pool's workers have all loaded their model, by their rows: at least one, and each says idle or busy.

    `processes` is what a caller that sees the actors knows: worker id -> the pid of its actor's current process
    (None while that process does not answer: starting, restarting). Then each of those workers needs a row that
    its current process wrote: a killed process's row says what it last said until its TTL. A caller that sees
    only rows (a gateway's client) passes none: every row counts.
    Raises RuntimeError for a worker whose model failed to load (its counted row says error)."""
    rows = list(rows)
    if processes is not None:
        by_id = {r.get("worker_id"): r for r in rows}
        counted = [r for name, pid in processes.items()
                   if pid is not None and (r := by_id.get(name)) is not None and r.get("pid") == pid]
        expected = len(processes)
    else:
        counted = rows
        expected = len(rows)
    bad = [r for r in counted if r.get("state") == "error"]
    if bad:
        raise RuntimeError(f"worker {bad[0].get('worker_id')} failed to load: {bad[0].get('error')}")
    return expected > 0 and len(counted) == expected and all(r.get("state") in READY_STATES for r in counted)


def wait_workers_ready(rows: Callable[[], Iterable[Mapping[str, Any]]], timeout: float, *,
                       processes: Callable[[], Mapping[str, int | None]] | None = None, every: float = 0.2) -> None:
    """Block until `workers_ready(rows(), processes())`, read anew every `every` s; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        live = processes() if processes is not None else None  # first: a row read after it can be its process's
        if workers_ready(rows(), live):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"workers not ready after {timeout:.0f}s")
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
