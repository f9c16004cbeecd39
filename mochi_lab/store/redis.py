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
import functools
import inspect
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mochi_lab.model import (
    RUNNING,
    STATUSES,
    JobNotFound,
    JobRecord,
    LeaseLost,
    StoreUnavailable,
    check_status,
    new_job_id,
    remove_artifacts,
)
from mochi_lab.store import redis_lua as lua
from mochi_lab.store.base import (
    PROGRESS_LOG_MAX,
    QUEUE_LIST_MAX,
    Claim,
    Store,
    active_limit_error,
    check_preview,
    claim_order,
    experiments_limit_error,
    job_matches,
)

_JSON_FIELDS = frozenset({"params", "tags", "artifacts", "timings", "meta", "live"})
_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_FIELD_SET = frozenset(_FIELDS)
_LIST_CHUNK = 200  # jobs fetched per round trip while filtering a history in Python

F = TypeVar("F", bound=Callable[..., Any])
# No CLIENT SETINFO on connect: least-privilege ACL users are not granted it (cluster/k8s/base/redis.yaml).
# redis-py 8 takes driver_info; older versions lib_name/lib_version.
_NO_SETINFO = ({"driver_info": None} if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
               else {"lib_name": None, "lib_version": None})


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs for HSET; None is left out (the field keeps its value)."""
    out: list[str] = []
    for name, value in fields.items():
        if value is not None:
            out += (name, _dumps(value) if name in _JSON_FIELDS else str(value))
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


def _guard(method: F) -> F:
    """Turn a lost connection into StoreUnavailable; the next call reconnects."""

    @functools.wraps(method)
    def wrapper(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._pid != os.getpid():  # first use, or a forked child: never share a parent's socket
                self._connect()
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis store at {self.where} is unavailable: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class RedisStore(Store):
    """`RedisStore("redis://host:port/db?prefix=name")`: every key lives under `name:`."""

    def __init__(
        self, url: str, max_attempts: int = 3, *, connect_timeout_s: float = 2.0, timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.max_attempts = max_attempts
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.prefix = dict(query).get("prefix") or "mochi"
        plain = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "prefix"])))
        self.where = parts.netloc.rsplit("@", 1)[-1] or parts.path
        self._plain, self._timeouts = plain, (connect_timeout_s, timeout_s)
        self._pid: int | None = None  # connects on first use, in the process that uses it

    @property
    def client(self) -> redis.Redis:
        """The redis-py client of this process (tests and tools; the store's own calls go through _guard)."""
        if self._pid != os.getpid():
            self._connect()
        return self._client

    def _connect(self) -> None:
        # One connection, shared by this process's threads under redis-py's lock: it skips the pool's
        # per-call bookkeeping (~15% of a call's client time). Short timeouts and a quick retry: a dead
        # server answers StoreUnavailable in seconds. Only connection errors are retried: a script whose
        # reply timed out may already have run. Options in the url's query (socket_timeout=...) win.
        client = redis.Redis.from_url(
            self._plain, decode_responses=True, single_connection_client=True,
            socket_connect_timeout=self._timeouts[0], socket_timeout=self._timeouts[1],
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2, supported_errors=(redis.ConnectionError,)),
            **_NO_SETINFO,
        )
        reg = client.register_script
        self._enqueue, self._claim, self._owner, self._finish = reg(lua.ENQUEUE), reg(lua.CLAIM), reg(lua.OWNER), reg(lua.FINISH)
        self._cancel, self._delete, self._requeue = reg(lua.CANCEL), reg(lua.DELETE), reg(lua.REQUEUE)
        self._page, self._get, self._put_experiment = reg(lua.PAGE), reg(lua.GET), reg(lua.PUT_EXPERIMENT)
        self._queued = reg(lua.QUEUED)
        self._release_worker = reg(lua.RELEASE_WORKER)
        self._progress, self._progress_since = reg(lua.PROGRESS), reg(lua.PROGRESS_SINCE)
        self._put_preview, self._get_preview = reg(lua.PUT_PREVIEW), reg(lua.GET_PREVIEW)
        self._queue_depth, self._lead = reg(lua.QUEUE_DEPTH), reg(lua.LEAD)
        self._client, self._pid = client, os.getpid()

    def __reduce__(self) -> tuple[Any, ...]:  # picklable by url: a worker opens its own connection
        return (type(self), (self.url, self.max_attempts))

    def __repr__(self) -> str:
        # never the password (nor the username): scheme://host:port/db and the prefix only
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            where = f"unix://{parts.path}"
        else:
            host = parts.hostname or "localhost"
            host = f"[{host}]" if ":" in host else host
            where = f"{parts.scheme}://{host}:{parts.port or 6379}/{parts.path.lstrip('/') or '0'}"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def close(self) -> None:
        if self._pid == os.getpid():
            self._client.close()
        self._pid = None

    @_guard
    def drop_all(self) -> int:
        """Delete every key under this store's prefix (tests, benchmarks); returns how many."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
        keys = list(self.client.scan_iter(match=pattern, count=1000))
        return sum(self.client.delete(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))

    # -- queue ---------------------------------------------------------------------------
    @_guard
    def enqueue(
        self, account: str, params: dict[str, Any], *, priority: int = 0, experiment: str | None = None,
        tags: Iterable[str] = (), idempotency_key: str | None = None, max_active: int | None = None,
    ) -> JobRecord:
        job = JobRecord(id=new_job_id(), account=account, params=dict(params), priority=int(priority),
                        experiment=experiment, tags=list(tags), idempotency_key=idempotency_key)
        has_key, has_experiment = int(idempotency_key is not None), int(experiment is not None)
        kind, value = self._enqueue(args=[
            self.prefix, account, job.id, has_key, idempotency_key or "", job.priority, _dumps(job.params),
            _dumps(job.tags), has_experiment, experiment or "", "" if max_active is None else int(max_active),
        ])
        if kind == "OLD":
            return _decode(value)
        if kind == "LIMIT":
            raise active_limit_error(account, int(value), int(max_active))
        job.created_at = float(value)  # stamped by the server's clock
        return job

    @_guard
    def claim(self, worker_id: str, lease_s: float) -> Claim | None:
        raw = self._claim(args=[self.prefix, worker_id, repr(float(lease_s)), self.max_attempts])
        if not raw:
            return None
        job = _decode(raw)
        return Claim(job=job, token=job.fence)

    def _owner_write(self, job_id: str, token: int, lease_s: float | None, fields: dict[str, Any]) -> bool:
        lease = "" if lease_s is None else repr(float(lease_s))
        return _owned(job_id, self._owner(args=[self.prefix, job_id, str(int(token)), lease, *_pairs(fields)]))

    @_guard
    def heartbeat(self, job_id: str, token: int, lease_s: float) -> bool:
        return self._owner_write(job_id, token, lease_s, {})

    @_guard
    def progress(
        self, job_id: str, token: int, *, stage: str, step: int | None = None, total: int | None = None,
        message: str = "", live: dict[str, Any] | None = None,
    ) -> bool:
        fields = {"stage": stage, "step": step, "total_steps": total, "message": message, "live": live}
        return _owned(job_id, self._progress(args=[self.prefix, job_id, str(int(token)), PROGRESS_LOG_MAX,
                                                   *_pairs(fields)]))

    @_guard
    def put_preview(self, job_id: str, token: int, step: int, data: bytes) -> None:
        encoded = base64.b64encode(check_preview(data)).decode()  # the client speaks text
        _owned(job_id, self._put_preview(args=[self.prefix, job_id, str(int(token)), int(step), encoded]))

    @_guard
    def get_preview(self, account: str, job_id: str) -> tuple[int, bytes] | None:
        raw = self._get_preview(args=[self.prefix, account, job_id])
        if raw is None:
            raise JobNotFound(f"job {job_id} not found")
        step, data = raw
        return None if data is None else (int(step), base64.b64decode(data))

    @_guard
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

    @_guard
    def complete(
        self, job_id: str, token: int, *, artifacts: dict[str, str], timings: dict[str, float], meta: dict[str, Any]
    ) -> None:
        self._finish_as(job_id, token, "done", {"artifacts": artifacts, "timings": timings, "meta": meta})

    @_guard
    def fail(
        self, job_id: str, token: int, *, error: str, traceback: str = "", timings: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        fields = {"error": error, "traceback": traceback, "timings": timings, "meta": meta}
        self._finish_as(job_id, token, "failed", fields)

    @_guard
    def finish_cancelled(
        self, job_id: str, token: int, *, timings: dict[str, float] | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        self._finish_as(job_id, token, "cancelled", {"timings": timings, "meta": meta})

    @_guard
    def cancel(self, account: str, job_id: str) -> JobRecord:
        raw = self._cancel(args=[self.prefix, account, job_id])
        if not raw:
            raise JobNotFound(f"job {job_id} not found")
        return _decode(raw)

    @_guard
    def requeue_expired(self, *, now: float | None = None) -> list[str]:
        """Take back running jobs whose lease expired; returns their ids (requeued, failed or cancelled)."""
        return list(self._requeue(args=[self.prefix, self.max_attempts, "" if now is None else repr(float(now))]))

    @_guard
    def release_worker(self, worker_id: str) -> list[str]:
        """Take back the running jobs of a worker that died or restarted, without waiting out their leases."""
        return list(self._release_worker(args=[self.prefix, worker_id, self.max_attempts]))

    # -- history -------------------------------------------------------------------------
    @_guard
    def get(self, account: str, job_id: str) -> JobRecord:
        raw = self._get(args=[self.prefix, account, job_id])
        if not raw:
            raise JobNotFound(f"job {job_id} not found")
        return _decode(raw)

    @_guard
    def queued(self, limit: int = QUEUE_LIST_MAX) -> list[JobRecord]:
        per_account = json.loads(self._queued(args=[self.prefix, limit]))
        return claim_order(([_decode(raw) for raw in docs] for docs in per_account), limit)

    def _range(self, index: str, start: int, stop: int) -> list[JobRecord]:
        return [_decode(raw) for raw in json.loads(self._page(args=[self.prefix, index, start, stop]))]

    @_guard
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

    @_guard
    def delete(self, account: str, job_id: str) -> None:
        # a running owner's next write finds no job and raises LeaseLost
        artifacts = self._delete(args=[self.prefix, account, job_id])
        if not artifacts:
            raise JobNotFound(f"job {job_id} not found")
        remove_artifacts(json.loads(artifacts))

    @_guard
    def counts(self, account: str) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self._key("s", account, status))
        return dict(zip(STATUSES, pipe.execute()))

    # -- workers -------------------------------------------------------------------------
    @_guard
    def put_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        worker_id = str(info["worker_id"])
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key("worker", worker_id), _dumps(info), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(self._key("workers"), worker_id)
        pipe.execute()

    @_guard
    def workers(self) -> list[dict[str, Any]]:
        ids = sorted(self.client.smembers(self._key("workers")))
        rows = self.client.mget([self._key("worker", i) for i in ids]) if ids else []
        gone = [i for i, row in zip(ids, rows) if row is None]
        if gone:  # their TTL ran out: forget them
            self.client.srem(self._key("workers"), *gone)
        return [json.loads(row) for row in rows if row is not None]

    @_guard
    def remove_worker(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key("worker", worker_id))
        pipe.srem(self._key("workers"), worker_id)
        pipe.execute()

    # -- the pool's controller -----------------------------------------------------------
    @_guard
    def queue_depth(self) -> dict[tuple[str, str, str], int]:
        flat = self._queue_depth(args=[self.prefix])
        return {(flat[i], flat[i + 1], flat[i + 2]): int(flat[i + 3]) for i in range(0, len(flat), 4)}

    @_guard
    def lead(self, role: str, holder: str, ttl_s: float, *, take: bool = False) -> bool:
        return self._lead(args=[self.prefix, role, holder, f"{ttl_s:.3f}", "1" if take else "0"]) == 1

    # -- the gateway's web sign-in -------------------------------------------------------
    @_guard
    def put_session(self, key: str, data: dict[str, Any], ttl_s: float) -> None:
        self.client.set(self._key("sess", key), _dumps(data), px=max(1, int(ttl_s * 1000)))

    @_guard
    def get_session(self, key: str) -> dict[str, Any] | None:
        (raw,) = self.client.mget([self._key("sess", key)])  # MGET: the store users' ACL has no GET
        return None if raw is None else json.loads(raw)

    @_guard
    def take_session(self, key: str) -> dict[str, Any] | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.mget([self._key("sess", key)])
        pipe.delete(self._key("sess", key))
        (raw,), _ = pipe.execute()  # MULTI: of concurrent takes, one reads it before it goes
        return None if raw is None else json.loads(raw)

    # -- experiments ---------------------------------------------------------------------
    @_guard
    def put_experiment(self, account: str, record: dict[str, Any], *, max_count: int | None = None) -> None:
        count = self._put_experiment(args=[self.prefix, account, str(record["name"]), _dumps(record),
                                           "" if max_count is None else int(max_count)])
        if count is not None:
            raise experiments_limit_error(account, int(count), int(max_count))

    @_guard
    def get_experiment(self, account: str, name: str) -> dict[str, Any]:
        raw = self.client.hget(self._key("exp", account), name)
        if raw is None:
            raise KeyError(f"experiment {name!r} not found")
        return json.loads(raw)

    @_guard
    def list_experiments(self, account: str) -> list[dict[str, Any]]:
        names = self.client.zrevrange(self._key("expo", account), 0, -1)
        rows = self.client.hmget(self._key("exp", account), names) if names else []
        return [json.loads(r) for r in rows if r is not None]


__all__ = ["RedisStore"]
