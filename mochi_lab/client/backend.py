"""The one interface a `MochiCluster`, its `Job`s and `Experiment`s talk to.

A backend is bound to one account, decided by whoever built it: the direct backend (store + Ray pool,
`mochi_lab.client.direct`) takes it from settings, for the embedded default and operators; a gateway backend
gets it from the server, which checks the caller's token. Handles, widgets and notebooks cannot tell
the two apart. Job state travels as `JobRecord`s (plain data); progress is part of the record
(stage, step, total_steps, message).
"""

from __future__ import annotations

import abc
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mochi_lab.client.follow import WAIT
from mochi_lab.model import JobRecord, job_row
from mochi_lab.params import GenerationParams, SubmitOptions

ARTIFACTS = ("video", "thumbnail")


class Backend(abc.ABC):
    """Jobs, artifacts, workers and experiments of one account."""

    account: str

    # -- jobs ------------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, params: GenerationParams, options: SubmitOptions, *, reuse: bool = True) -> JobRecord:
        """Queue validated params. `reuse`: an identical done or in-flight job is returned instead."""

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job with its progress (JobNotFound for unknown ids and other accounts' ids)."""

    @abc.abstractmethod
    def list(self, *, status: str | None = None, experiment: str | None = None, tag: str | None = None,
             text: str | None = None, limit: int = 50, offset: int = 0) -> list[JobRecord]:
        """This account's jobs, newest first."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> JobRecord: ...

    @abc.abstractmethod
    def delete(self, job_id: str) -> None: ...

    def rerun(self, job_id: str, *, priority: int = 0) -> JobRecord:
        """The job's exact params queued again (same resolved seed and model) as a new job, bypassing the
        result cache and tagged `reproduces:<id>`: what `Job.reproduce` and the gateway's `POST /rerun` do."""
        record = self.get(job_id)
        options = SubmitOptions.parse(priority=priority, tags=[f"reproduces:{record.id}"])
        return self.submit(GenerationParams.stored(record.params), options, reuse=False)

    @abc.abstractmethod
    def counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def queue(self, limit: int = 50) -> list[dict[str, Any]]:
        """The cluster's queued jobs, every account's, in the order workers will take them (`queue_rows`)."""

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobRecord]:
        """The job's states until it finishes (the last one yielded is finished): TimeoutError after
        `timeout` s. This one polls; a backend that can be told of changes pushes them instead."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        while True:
            record = self.get(job_id)
            yield record
            if record.finished:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {record.status} ({record.stage}) after {timeout}s")
            wait = WAIT.delay(record.stage, time.monotonic() - started)
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))

    @abc.abstractmethod
    def preview(self, job_id: str) -> tuple[int, bytes] | None:
        """(step, animated WebP) of the job's live preview, or None (not yet, or done: see the video)."""

    # -- artifacts -------------------------------------------------------------
    @abc.abstractmethod
    def artifact_path(self, job_id: str, name: str) -> Path:
        """A local file holding the job's artifact ("video" or "thumbnail"); FileNotFoundError if none."""

    def artifact(self, job_id: str, name: str) -> bytes:
        return self.artifact_path(job_id, name).read_bytes()

    def save_artifact(self, job_id: str, name: str, dest: Path) -> Path:
        shutil.copyfile(self.artifact_path(job_id, name), dest)
        return dest

    # -- LoRA adapters (mochi_lab.adapters) -------------------------------------
    @abc.abstractmethod
    def put_adapter(self, name: str, data: IO[bytes], *, model: str | None = None) -> dict[str, Any]:
        """Check the safetensors stream `data` as a LoRA adapter for `model` (None: this backend's) and keep it as
        `name`, replacing one of that name; its record. AdapterRejected (or RecordTooLarge, QuotaExceeded) naming
        the reason, with nothing stored."""

    @abc.abstractmethod
    def adapters(self) -> list[dict[str, Any]]:
        """This account's adapters' records (name, sha256, bytes, model, rank, modules, dtypes, created_at), by name."""

    @abc.abstractmethod
    def delete_adapter(self, name: str) -> None:
        """AdapterNotFound for an unknown name, and for another account's."""

    # -- the pool --------------------------------------------------------------
    @abc.abstractmethod
    def models(self) -> list[str]:
        """Model names the pool can serve."""

    @abc.abstractmethod
    def workers(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def scale(self, n: int) -> None: ...

    @abc.abstractmethod
    def shutdown_pool(self) -> None: ...

    @abc.abstractmethod
    def wait_ready(self, timeout: float) -> None: ...

    def dashboard_url(self) -> str | None:
        """The Ray dashboard, when one answers from this process; None by default (a gateway's notebooks
        reach no Ray)."""
        return None

    # -- experiments -----------------------------------------------------------
    @abc.abstractmethod
    def get_experiment(self, name: str) -> dict[str, Any]:
        """KeyError when this account has no such experiment."""

    @abc.abstractmethod
    def put_experiment(self, record: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def list_experiments(self) -> list[dict[str, Any]]: ...

    # -- the handle ------------------------------------------------------------
    @abc.abstractmethod
    def info(self) -> dict[str, str]:
        """backend, address, account, model, and where known store and workers: for reprs (no secrets)."""

    def close(self) -> None:
        pass


def sees_job(owner: str | None, account: str, *, admin: bool) -> bool:
    """Whether `account` may see the id and owner of a job of `owner`: its own, or any for an admin. The one
    rule of the queue's rows and the workers' rows (another account's job is a place or a busy worker)."""
    return owner == account or admin


def queue_rows(records: Iterable[JobRecord], account: str, *, admin: bool) -> list[dict[str, Any]]:
    """The queue as `account` may see it: its own jobs whole (id, prompt), other accounts' jobs by place,
    model and size only, and their id and account's name only for an admin."""
    rows = []
    for position, r in enumerate(records, start=1):
        row = job_row(r)
        mine, seen = r.account == account, sees_job(r.account, account, admin=admin)
        rows.append({
            "position": position, "mine": mine, "account": r.account if seen else None,
            "id": r.id if seen else None, "prompt": row["prompt"] if mine else None,
            **{k: row[k] for k in ("model", "width", "height", "num_frames")}, "steps": row["num_inference_steps"],
            "priority": r.priority, "created_at": r.created_at,
        })
    return rows


# What any account sees of a worker; the rest (node, pid, memory, errors, stats) is an admin's.
WORKER_FIELDS = ("worker_id", "device", "gpu_name", "model", "state", "jobs_done", "started_at", "idle_since",
                 "gpu_utilization", "gpu_power_w", "cpu_percent")


def worker_rows(rows: Iterable[dict[str, Any]], account: str, *, admin: bool) -> list[dict[str, Any]]:
    """The workers as `account` may see them: each one's state, and its current job's id only where
    `sees_job` allows (another account's job shows as busy with no id); whole rows for an admin."""
    out = []
    for row in rows:
        seen = sees_job(row.get("current_account"), account, admin=admin)
        shown = dict(row) if admin else {k: row.get(k) for k in WORKER_FIELDS}
        shown.update(current_job=row.get("current_job") if seen else None,
                     mine=row.get("current_job") is not None and row.get("current_account") == account)
        out.append(shown)
    return out


__all__ = ["ARTIFACTS", "WORKER_FIELDS", "Backend", "queue_rows", "sees_job", "worker_rows"]
