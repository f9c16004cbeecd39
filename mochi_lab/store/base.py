"""The store contract: durable jobs, leased claims, progress and per-account history.

Both backends (SQLite, Redis) implement `Store` and pass the same contract suite.
The store knows nothing of torch or Ray: params, artifacts, timings and meta are plain JSON.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import mochi_lab.model as _model
from mochi_lab._moved import moved_names

if TYPE_CHECKING:
    from mochi_lab.model import JobRecord

# a job's progress log: enough for every step of the longest allowed job and its retries; a finished
# job's log stays a while for listeners still reading it
PROGRESS_LOG_MAX = 4096
PROGRESS_LOG_KEEP_S = 600
PREVIEW_MAX_BYTES = 96 * 1024  # one job's live preview (an animated strip of ~64 KB), overwritten
QUEUE_LIST_MAX = 1000  # queued jobs `Store.queued` reads at most, across accounts

# The job's record, statuses, id, artifacts and errors live in mochi_lab.model; their old names here
# still answer for one release, with a DeprecationWarning.
__getattr__ = moved_names(__name__)


def experiments_limit_error(account: str, count: int, limit: int) -> _model.QuotaExceeded:
    return _model.QuotaExceeded(f"account {account} has {count} experiments; the limit is max_experiments={limit} "
                         "(a new experiment needs a name already in use); nothing was written")


def active_limit_error(account: str, active: int, limit: int) -> _model.QuotaExceeded:
    return _model.QuotaExceeded(f"account {account} has {active} queued or running jobs; the limit is "
                         f"max_active_jobs={limit} (wait for some to finish or cancel some); nothing was queued")


@dataclass
class Claim:
    """A leased job. `token` fences every later write by this owner."""

    job: JobRecord
    token: int


def worker_lost_error(attempts: int) -> str:
    """The error of a job whose lease expired after its last allowed claim."""
    return f"worker lost {attempts} times"


def job_matches(
    job: JobRecord, *, experiment: str | None = None, tag: str | None = None, text: str | None = None
) -> bool:
    """The history filters shared by both backends; `text` is a case-insensitive prompt substring."""
    if experiment is not None and job.experiment != experiment:
        return False
    if tag is not None and tag not in job.tags:
        return False
    if text is not None and text.casefold() not in str(job.params.get("prompt", "")).casefold():
        return False
    return True


def claim_order(per_account: Iterable[list[JobRecord]], limit: int) -> list[JobRecord]:
    """Queued jobs in the order workers take them if nothing else arrives: one job from each account in
    turn (accounts given longest-unserved first), each account's own jobs already by priority then age.
    A served account goes to the back, so the turn order stays the same round after round."""
    queues = [list(q) for q in per_account]
    out: list[JobRecord] = []
    for rank in range(max(map(len, queues), default=0)):
        for queue in queues:
            if rank < len(queue):
                out.append(queue[rank])
                if len(out) >= limit:
                    return out
    return out


class Store(abc.ABC):
    """Jobs, queue, leases, progress, history, workers and experiments, scoped per account."""

    url: str

    # -- queue -----------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(
        self,
        account: str,
        params: dict[str, Any],
        *,
        priority: int = 0,
        experiment: str | None = None,
        tags: Iterable[str] = (),
        idempotency_key: str | None = None,
        max_active: int | None = None,
    ) -> JobRecord:
        """Queue a job. The same (account, idempotency_key) returns the first job again.

        `max_active`: refuse (QuotaExceeded) a new job while the account has that many queued or
        running ones, checked and queued in one atomic step, so gateway replicas cannot both pass."""

    @abc.abstractmethod
    def claim(self, worker_id: str, lease_s: float) -> Claim | None:
        """Atomically take the next job: fair across accounts, by priority then age inside one.

        Expired leases are requeued first (attempt + 1, failing after `max_attempts`).
        """

    @abc.abstractmethod
    def queued(self, limit: int = QUEUE_LIST_MAX) -> list[JobRecord]:
        """Every account's queued jobs in the order workers will take them (`claim_order`), at most `limit`.

        It crosses accounts: only for the pool's owner; a door shows other accounts' jobs redacted."""

    @abc.abstractmethod
    def heartbeat(self, job_id: str, token: int, lease_s: float) -> bool:
        """Extend the lease; returns whether a cancel was requested. Raises LeaseLost."""

    @abc.abstractmethod
    def progress(
        self,
        job_id: str,
        token: int,
        *,
        stage: str,
        step: int | None = None,
        total: int | None = None,
        message: str = "",
        live: dict[str, Any] | None = None,
    ) -> bool:
        """Record stage and step k/N (and the attempt's `live` figures, when given; a claim clears them);
        returns whether a cancel was requested. Raises LeaseLost."""

    @abc.abstractmethod
    def progress_since(self, account: str, job_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        """Every `progress` write of the job after `after_seq`, in order (-1: from its first).

        Entries: {"seq", "status", "stage", "step", "total_steps", "message", "attempts"}, as the job
        stood after that write. A job keeps at most PROGRESS_LOG_MAX entries; a finished job's log goes
        after PROGRESS_LOG_KEEP_S. JobNotFound for another account's id, as `get`."""

    @abc.abstractmethod
    def put_preview(self, job_id: str, token: int, step: int, data: bytes) -> None:
        """Keep `data` (an image of at most PREVIEW_MAX_BYTES) as the running job's preview at `step`,
        replacing the last one. A done job's preview goes (the video replaces it); a cancelled or failed
        job keeps its last. Raises LeaseLost, or ValueError when too large."""

    @abc.abstractmethod
    def get_preview(self, account: str, job_id: str) -> tuple[int, bytes] | None:
        """(step, image) of the job's preview, or None. JobNotFound for another account's id, as `get`."""

    @abc.abstractmethod
    def complete(
        self,
        job_id: str,
        token: int,
        *,
        artifacts: dict[str, str],
        timings: dict[str, float],
        meta: dict[str, Any],
    ) -> None:
        """Mark done; a cancel request that came too late is cleared (the job answers done).

        Raises LeaseLost when `token` no longer owns the job."""

    @abc.abstractmethod
    def fail(
        self,
        job_id: str,
        token: int,
        *,
        error: str,
        traceback: str = "",
        timings: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Mark failed with its error (a pending cancel request is cleared, as in `complete`). Raises LeaseLost."""

    @abc.abstractmethod
    def finish_cancelled(
        self, job_id: str, token: int, *, timings: dict[str, float] | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        """The worker acknowledges a cancel request on a running job. Raises LeaseLost."""

    @abc.abstractmethod
    def cancel(self, account: str, job_id: str) -> JobRecord:
        """Cancel: a queued job at once, a running job by flag; returns the job as it is now.

        A finished job is returned unchanged (a done or failed one with cancel_requested False): when a
        cancel races the last step, whichever the store saw first wins, and the record says which."""

    @abc.abstractmethod
    def requeue_expired(self, *, now: float | None = None) -> list[str]:
        """Requeue running jobs whose lease expired; returns their ids."""

    @abc.abstractmethod
    def release_worker(self, worker_id: str) -> list[str]:
        """Take back the running jobs claimed by `worker_id` at once, as if their leases had expired
        (requeued with the attempt counted, failed after `max_attempts`, cancelled when a cancel waits).

        For a worker known dead or restarted under the same id; the next claim raises the fencing
        token, so the old owner's writes are refused. Returns the ids taken back."""

    # -- history ---------------------------------------------------------------
    @abc.abstractmethod
    def get(self, account: str, job_id: str) -> JobRecord:
        """The job, or JobNotFound (also for another account's id)."""

    @abc.abstractmethod
    def list(
        self,
        account: str,
        *,
        status: str | None = None,
        experiment: str | None = None,
        tag: str | None = None,
        text: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        """The account's jobs, newest first."""

    @abc.abstractmethod
    def delete(self, account: str, job_id: str) -> None:
        """Remove the job and its artifact files. A running job is cancelled first."""

    @abc.abstractmethod
    def counts(self, account: str) -> dict[str, int]:
        """Jobs per status, every status present."""

    # -- workers ---------------------------------------------------------------
    @abc.abstractmethod
    def put_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        """Publish a worker's row (keyed by info['worker_id']); it vanishes after ttl_s unless renewed."""

    @abc.abstractmethod
    def workers(self) -> list[dict[str, Any]]:
        """Live worker rows, sorted by worker_id."""

    @abc.abstractmethod
    def remove_worker(self, worker_id: str) -> None: ...

    # -- the pool's controller -------------------------------------------------
    @abc.abstractmethod
    def queue_depth(self) -> dict[tuple[str, str, str], int]:
        """Queued and running jobs of every account, counted by (account, model, status); a job whose
        params name no model counts under "?"."""

    @abc.abstractmethod
    def lead(self, role: str, holder: str, ttl_s: float, *, take: bool = False) -> bool:
        """Hold `role` for `ttl_s` more seconds: True when `holder` had it, nobody did, or the last
        holder's time ran out (or `take`: taken over whoever holds it). One holder at a time."""

    # -- the gateway's web sign-in -----------------------------------------------
    # Sessions and pending logins, shared by every gateway replica. The gateway keys them by a hash of
    # the browser's secret, so the store never holds a usable cookie.
    @abc.abstractmethod
    def put_session(self, key: str, data: dict[str, Any], ttl_s: float) -> None:
        """Keep `data` under `key` for `ttl_s` seconds (replacing what was there)."""

    @abc.abstractmethod
    def get_session(self, key: str) -> dict[str, Any] | None:
        """The data under `key`; None when there is none or its time ran out."""

    @abc.abstractmethod
    def take_session(self, key: str) -> dict[str, Any] | None:
        """Remove the data under `key` and return it (None as `get_session`); of concurrent takes, one gets it."""

    # -- experiments -----------------------------------------------------------
    @abc.abstractmethod
    def put_experiment(self, account: str, record: dict[str, Any], *, max_count: int | None = None) -> None:
        """Create or update an experiment (keyed by record['name']). `max_count`: refuse (QuotaExceeded) a
        new one while the account has that many, checked and written in one atomic step."""

    @abc.abstractmethod
    def get_experiment(self, account: str, name: str) -> dict[str, Any]:
        """Raises KeyError when the account has no such experiment."""

    @abc.abstractmethod
    def list_experiments(self, account: str) -> list[dict[str, Any]]:
        """Newest first."""

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        pass


def check_preview(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray)) or len(data) > PREVIEW_MAX_BYTES:
        raise ValueError(f"a preview must be at most {PREVIEW_MAX_BYTES} bytes, got {len(data) if data else data!r}")
    return bytes(data)

