"""Redis backend: shared, multi-user. Every state change is one Lua script, so it is atomic.

Keys, all under `{prefix}:` (default prefix `mochi`):
  job:{id}            hash, one field per JobRecord field (None = absent) plus `seq`
  plog:{id}           list of JSON progress entries (the job after each `progress`), expiring once it ends
  preview:{id}        hash step, data (base64 image): the running job's latest preview
  q:{account}         zset of queued jobs, score -priority, member "{seq:016d}:{id}" (FIFO on ties)
  ready               zset of accounts with queued jobs, score = that account's last claim number
  lastclaim           hash account -> claim number (fairness: the longest-unserved account goes next)
  leases              zset id -> lease expiry (server clock)
  h:{account}         zset id -> seq, the account's history
  s:{account}:{st}    zset id -> seq per status: counts and status-filtered lists without scans
  idem:{account}      hash idempotency key -> id
  worker:{id}         string JSON with a TTL; `workers` is the set of ids ever published
  e:{len(account)}:{account}:{experiment}   zset id -> seq, the experiment's jobs
  exp:{account}, expo:{account}   experiments (hash name -> JSON) and their order (zset)
  sess:{key}          string JSON with a TTL: the gateway's web sessions and pending logins
Times come from the Redis server's clock, so workers on different nodes agree on leases.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from mochi_lab.model import (
    RUNNING,
    STATUSES,
    JobNotFound,
    JobRecord,
    LeaseLost,
    check_status,
    new_job_id,
    remove_artifacts,
)
from mochi_lab.store.base import (
    PROGRESS_LOG_MAX,
    QUEUE_LIST_MAX,
    Claim,
    Store,
    active_limit_error,
    check_preview,
    claim_order,
    job_matches,
)
from mochi_lab.store.redis_conn import dumps, guard
from mochi_lab.store.redis_side import SideKeys

_JSON_FIELDS = frozenset({"params", "tags", "artifacts", "timings", "meta", "live"})
_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_FIELD_SET = frozenset(_FIELDS)
_LIST_CHUNK = 200  # jobs fetched per round trip while filtering a history in Python


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs for HSET; None is left out (the field keeps its value)."""
    out: list[str] = []
    for name, value in fields.items():
        if value is not None:
            out += (name, dumps(value) if name in _JSON_FIELDS else str(value))
    return out


def _owned(job_id: str, out: list[str]) -> bool:
    """An owner script's reply: cancel_requested, or LeaseLost."""
    if out[0] == "LOST":
        raise LeaseLost(f"job {job_id}: {out[1]}")
    return out[1] == "1"


def _decode(doc: str | dict[str, Any]) -> JobRecord:
    """A job from a script's JSON doc (or one parsed already): JSON and number fields arrive typed."""
    data = json.loads(doc) if isinstance(doc, str) else doc
    data["cancel_requested"] = data.get("cancel_requested") == "1"
    return JobRecord(**{k: v for k, v in data.items() if k in _FIELD_SET})


class RedisStore(SideKeys, Store):
    """`RedisStore("redis://host:port/db?prefix=name")`: every key lives under `name:`. Its connection is
    `RedisConnection`'s (redis_conn.py), its keys beside the jobs `SideKeys`' (redis_side.py)."""

    # -- queue ---------------------------------------------------------------------------
    @guard
    def enqueue(
        self, account: str, params: dict[str, Any], *, priority: int = 0, experiment: str | None = None,
        tags: Iterable[str] = (), idempotency_key: str | None = None, max_active: int | None = None,
    ) -> JobRecord:
        job = JobRecord(id=new_job_id(), account=account, params=dict(params), priority=int(priority),
                        experiment=experiment, tags=list(tags), idempotency_key=idempotency_key)
        has_key, has_experiment = int(idempotency_key is not None), int(experiment is not None)
        kind, value = self._enqueue(args=[
            self.prefix, account, job.id, has_key, idempotency_key or "", job.priority, dumps(job.params),
            dumps(job.tags), has_experiment, experiment or "", "" if max_active is None else int(max_active),
        ])
        if kind == "OLD":
            return _decode(value)
        if kind == "LIMIT":
            raise active_limit_error(account, int(value), int(max_active))
        job.created_at = float(value)  # stamped by the server's clock
        return job

    @guard
    def claim(self, worker_id: str, lease_s: float) -> Claim | None:
        raw = self._claim(args=[self.prefix, worker_id, repr(float(lease_s)), self.max_attempts])
        if not raw:
            return None
        job = _decode(raw)
        return Claim(job=job, token=job.fence)

    def _owner_write(self, job_id: str, token: int, lease_s: float | None, fields: dict[str, Any]) -> bool:
        lease = "" if lease_s is None else repr(float(lease_s))
        return _owned(job_id, self._owner(args=[self.prefix, job_id, str(int(token)), lease, *_pairs(fields)]))

    @guard
    def heartbeat(self, job_id: str, token: int, lease_s: float) -> bool:
        return self._owner_write(job_id, token, lease_s, {})

    @guard
    def progress(
        self, job_id: str, token: int, *, stage: str, step: int | None = None, total: int | None = None,
        message: str = "", live: dict[str, Any] | None = None,
    ) -> bool:
        fields = {"stage": stage, "step": step, "total_steps": total, "message": message, "live": live}
        return _owned(job_id, self._progress(args=[self.prefix, job_id, str(int(token)), PROGRESS_LOG_MAX,
                                                   *_pairs(fields)]))

    @guard
    def put_preview(self, job_id: str, token: int, step: int, data: bytes) -> None:
        encoded = base64.b64encode(check_preview(data)).decode()  # the client speaks text
        _owned(job_id, self._put_preview(args=[self.prefix, job_id, str(int(token)), int(step), encoded]))

    @guard
    def get_preview(self, account: str, job_id: str) -> tuple[int, bytes] | None:
        raw = self._get_preview(args=[self.prefix, account, job_id])
        if raw is None:
            raise JobNotFound(f"job {job_id} not found")
        step, data = raw
        return None if data is None else (int(step), base64.b64decode(data))

    @guard
    def progress_since(self, account: str, job_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        first = max(int(after_seq) + 1, 0)
        raw = self._progress_since(args=[self.prefix, account, job_id, first])
        if raw is None:
            raise JobNotFound(f"job {job_id} not found")
        return [{"seq": first + i, "status": RUNNING, **json.loads(e)} for i, e in enumerate(raw)]

    def _finish_as(self, job_id: str, token: int, status: str, fields: dict[str, Any]) -> None:
        out = self._finish(args=[self.prefix, job_id, str(int(token)), status, *_pairs(fields)])
        if out[0] == "LOST":
            raise LeaseLost(f"job {job_id}: {out[1]}")

    @guard
    def complete(
        self, job_id: str, token: int, *, artifacts: dict[str, str], timings: dict[str, float], meta: dict[str, Any]
    ) -> None:
        self._finish_as(job_id, token, "done", {"artifacts": artifacts, "timings": timings, "meta": meta})

    @guard
    def fail(
        self, job_id: str, token: int, *, error: str, traceback: str = "", timings: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        fields = {"error": error, "traceback": traceback, "timings": timings, "meta": meta}
        self._finish_as(job_id, token, "failed", fields)

    @guard
    def finish_cancelled(
        self, job_id: str, token: int, *, timings: dict[str, float] | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        self._finish_as(job_id, token, "cancelled", {"timings": timings, "meta": meta})

    @guard
    def cancel(self, account: str, job_id: str) -> JobRecord:
        raw = self._cancel(args=[self.prefix, account, job_id])
        if not raw:
            raise JobNotFound(f"job {job_id} not found")
        return _decode(raw)

    @guard
    def requeue_expired(self, *, now: float | None = None) -> list[str]:
        """Take back running jobs whose lease expired; returns their ids (requeued, failed or cancelled)."""
        return list(self._requeue(args=[self.prefix, self.max_attempts, "" if now is None else repr(float(now))]))

    @guard
    def release_worker(self, worker_id: str) -> list[str]:
        """Take back the running jobs of a worker that died or restarted, without waiting out their leases."""
        return list(self._release_worker(args=[self.prefix, worker_id, self.max_attempts]))

    # -- history -------------------------------------------------------------------------
    @guard
    def get(self, account: str, job_id: str) -> JobRecord:
        raw = self._get(args=[self.prefix, account, job_id])
        if not raw:
            raise JobNotFound(f"job {job_id} not found")
        return _decode(raw)

    @guard
    def queued(self, limit: int = QUEUE_LIST_MAX) -> list[JobRecord]:
        per_account = json.loads(self._queued(args=[self.prefix, limit]))
        return claim_order(([_decode(raw) for raw in docs] for docs in per_account), limit)

    def _range(self, index: str, start: int, stop: int) -> list[JobRecord]:
        return [_decode(raw) for raw in json.loads(self._page(args=[self.prefix, index, start, stop]))]

    @guard
    def list(
        self, account: str, *, status: str | None = None, experiment: str | None = None, tag: str | None = None,
        text: str | None = None, limit: int = 50, offset: int = 0,
    ) -> list[JobRecord]:
        check_status(status)
        if limit <= 0:
            return []
        # the narrowest index answers; filters it cannot answer are applied here, a chunk per round trip
        if experiment is not None:
            index = self._key("e", str(len(account.encode())), account, experiment)
        else:
            index = self._key("s", account, status) if status else self._key("h", account)
        if tag is None and text is None and (experiment is None or status is None):
            return self._range(index, offset, offset + limit - 1)
        matched: list[JobRecord] = []
        start = 0
        while len(matched) < offset + limit:
            chunk = self._range(index, start, start + _LIST_CHUNK - 1)
            if not chunk:
                break
            matched += [j for j in chunk
                        if (status is None or j.status == status) and job_matches(j, tag=tag, text=text)]
            start += _LIST_CHUNK
        return matched[offset : offset + limit]

    @guard
    def delete(self, account: str, job_id: str) -> None:
        # a running owner's next write finds no job and raises LeaseLost
        artifacts = self._delete(args=[self.prefix, account, job_id])
        if not artifacts:
            raise JobNotFound(f"job {job_id} not found")
        remove_artifacts(json.loads(artifacts))

    @guard
    def counts(self, account: str) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self._key("s", account, status))
        return dict(zip(STATUSES, pipe.execute()))


__all__ = ["RedisStore"]
