"""Redis backend: shared, multi-user. Every state change is one Lua script, so it is atomic.

Keys, all under `{prefix}:` (default prefix `mochi`):
  job:{id}            hash, one field per JobRecord field (None = absent) plus `seq`
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
Times come from the Redis server's clock, so workers on different nodes agree on leases.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mochi_lab.store.base import (
    STATUSES,
    Claim,
    JobNotFound,
    JobRecord,
    LeaseLost,
    Store,
    StoreUnavailable,
    check_status,
    job_matches,
    new_job_id,
    remove_artifacts,
)

_LIB = r"""
local P = ARGV[1]
local function now_str()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local function jkey(id) return P .. ':job:' .. id end
-- fields stored as JSON text or numbers: spliced into a doc as they are
local RAW = {params = 1, tags = 1, artifacts = 1, timings = 1, meta = 1, step = 1, total_steps = 1, priority = 1,
             attempts = 1, fence = 1, seq = 1, created_at = 1, started_at = 1, finished_at = 1, lease_expires_at = 1}
-- the whole job as one JSON object: one bulk reply and one json.loads in Python, not 50 and 6
local function doc(k)
  local h, parts = redis.call('HGETALL', k), {}
  for i = 1, #h, 2 do
    local v = h[i + 1]
    if not RAW[h[i]] then v = cjson.encode(v) end
    parts[#parts + 1] = '"' .. h[i] .. '":' .. v
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function qkey(acc) return P .. ':q:' .. acc end
local function skey(acc, st) return P .. ':s:' .. acc .. ':' .. st end
-- the account's length keeps "a:b" + "c" and "a" + "b:c" apart
local function ekey(acc, exp) return P .. ':e:' .. string.len(acc) .. ':' .. acc .. ':' .. exp end
local function qmember(seq, id) return string.format('%016d', tonumber(seq)) .. ':' .. id end
local function move(id, acc, seq, old, new)
  redis.call('ZREM', skey(acc, old), id)
  redis.call('ZADD', skey(acc, new), seq, id)
end
local function push(id, acc, seq, prio)
  redis.call('ZADD', qkey(acc), -tonumber(prio), qmember(seq, id))
  if not redis.call('ZSCORE', P .. ':ready', acc) then
    redis.call('ZADD', P .. ':ready', redis.call('HGET', P .. ':lastclaim', acc) or 0, acc)
  end
end
local function unqueue(id, acc, seq)
  redis.call('ZREM', qkey(acc), qmember(seq, id))
  if redis.call('ZCARD', qkey(acc)) == 0 then redis.call('ZREM', P .. ':ready', acc) end
end
local function finish(k, id, acc, seq, old, st, now)
  redis.call('HSET', k, 'status', st, 'stage', st, 'finished_at', now)
  redis.call('HDEL', k, 'lease_expires_at')
  redis.call('ZREM', P .. ':leases', id)
  move(id, acc, seq, old, st)
end
local function requeue_expired(now, limit, maxatt)
  local ids = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', '(' .. now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. ':leases', id)
    local k = jkey(id)
    local f = redis.call('HMGET', k, 'status', 'account', 'seq', 'priority', 'attempts', 'cancel_requested')
    if f[1] == 'running' then
      if f[6] == '1' then  -- nobody is left to acknowledge the cancel
        finish(k, id, f[2], f[3], 'running', 'cancelled', now)
      elseif tonumber(f[5]) >= maxatt then
        finish(k, id, f[2], f[3], 'running', 'failed', now)
        redis.call('HSET', k, 'error', 'worker lost ' .. f[5] .. ' times')
      else
        redis.call('HSET', k, 'status', 'queued', 'stage', 'queued')
        redis.call('HDEL', k, 'worker_id', 'lease_expires_at')
        move(id, f[2], f[3], 'running', 'queued')
        push(id, f[2], f[3], f[4])
      end
    end
  end
  return ids
end
-- nil when ARGV[3] (the token) owns the running job, else why not
local function lost(k, token)
  local f = redis.call('HMGET', k, 'status', 'fence')
  if not f[1] then return 'no longer exists' end
  if f[1] ~= 'running' or f[2] ~= token then
    return 'token ' .. token .. ' lost the lease (now ' .. f[1] .. ', token ' .. f[2] .. ')'
  end
  return nil
end
"""

# ARGV: P, account, id, has key ('0'/'1'), idempotency key, priority, params JSON, tags JSON, has experiment, experiment
_ENQUEUE = _LIB + r"""
local acc, id, has_idem, idem, prio = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local k = jkey(id)
if has_idem == '1' then
  local old = redis.call('HGET', P .. ':idem:' .. acc, idem)
  if old and redis.call('EXISTS', jkey(old)) == 1 then return {'OLD', doc(jkey(old))} end
  redis.call('HSET', P .. ':idem:' .. acc, idem, id)
  redis.call('HSET', k, 'idempotency_key', idem)
end
local seq, now = redis.call('INCR', P .. ':seq'), now_str()
if ARGV[9] == '1' then
  redis.call('HSET', k, 'experiment', ARGV[10])
  redis.call('ZADD', ekey(acc, ARGV[10]), seq, id)
end
redis.call('HSET', k, 'id', id, 'account', acc, 'priority', prio, 'params', ARGV[7], 'tags', ARGV[8],
           'created_at', now, 'seq', seq, 'status', 'queued', 'stage', 'queued', 'step', 0, 'total_steps', 0,
           'message', '', 'attempts', 0, 'fence', 0, 'cancel_requested', 0,
           'artifacts', '{}', 'timings', '{}', 'meta', '{}')
redis.call('ZADD', P .. ':h:' .. acc, seq, id)
redis.call('ZADD', skey(acc, 'queued'), seq, id)
push(id, acc, seq, prio)
return {'NEW', now}
"""

_CLAIM = _LIB + r"""
local worker, lease_s = ARGV[2], tonumber(ARGV[3])
local now = now_str()
requeue_expired(now, 100, tonumber(ARGV[4]))
for _ = 1, 1000 do
  local accs = redis.call('ZRANGE', P .. ':ready', 0, 0)
  if #accs == 0 then return false end
  local acc = accs[1]
  local popped = redis.call('ZPOPMIN', qkey(acc))
  if #popped == 0 then
    redis.call('ZREM', P .. ':ready', acc)
  else
    local id = string.sub(popped[1], 18)
    local k = jkey(id)
    local n = redis.call('INCR', P .. ':claimseq')
    redis.call('HSET', P .. ':lastclaim', acc, n)
    if redis.call('ZCARD', qkey(acc)) == 0 then redis.call('ZREM', P .. ':ready', acc)
    else redis.call('ZADD', P .. ':ready', n, acc) end
    if redis.call('HGET', k, 'status') == 'queued' then  -- else a stray entry: skip it
      local exp = string.format('%.6f', tonumber(now) + lease_s)
      redis.call('HINCRBY', k, 'fence', 1)
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('HSET', k, 'status', 'running', 'stage', 'claimed', 'step', 0, 'message', '',
                 'worker_id', worker, 'lease_expires_at', exp)
      redis.call('HSETNX', k, 'started_at', now)
      move(id, acc, redis.call('HGET', k, 'seq'), 'queued', 'running')
      redis.call('ZADD', P .. ':leases', exp, id)
      return doc(k)
    end
  end
end
return false
"""

# ARGV: P, id, token, lease_s ('' keeps the lease), then field/value pairs to set
_OWNER = _LIB + r"""
local k, token = jkey(ARGV[2]), ARGV[3]
local why = lost(k, token)
if why then return {'LOST', why} end
if ARGV[4] ~= '' then
  local exp = string.format('%.6f', tonumber(now_str()) + tonumber(ARGV[4]))
  redis.call('HSET', k, 'lease_expires_at', exp)
  redis.call('ZADD', P .. ':leases', exp, ARGV[2])
end
if #ARGV > 4 then redis.call('HSET', k, unpack(ARGV, 5)) end
return {'OK', redis.call('HGET', k, 'cancel_requested')}
"""

# ARGV: P, id, token, final status, then field/value pairs to set
_FINISH = _LIB + r"""
local id, token = ARGV[2], ARGV[3]
local k = jkey(id)
local why = lost(k, token)
if why then return {'LOST', why} end
local f = redis.call('HMGET', k, 'account', 'seq')
finish(k, id, f[1], f[2], 'running', ARGV[4], now_str())
if #ARGV > 4 then redis.call('HSET', k, unpack(ARGV, 5)) end
return {'OK'}
"""

_CANCEL = _LIB + r"""
local acc, id = ARGV[2], ARGV[3]
local k = jkey(id)
local f = redis.call('HMGET', k, 'account', 'status', 'seq')
if f[1] ~= acc then return false end
if f[2] == 'queued' then
  unqueue(id, acc, f[3])
  redis.call('HSET', k, 'status', 'cancelled', 'stage', 'cancelled', 'finished_at', now_str())
  move(id, acc, f[3], 'queued', 'cancelled')
elseif f[2] == 'running' then
  redis.call('HSET', k, 'cancel_requested', '1')
end
return doc(k)
"""

# returns the artifacts JSON of the deleted job, false when the account has no such job
_DELETE = _LIB + r"""
local acc, id = ARGV[2], ARGV[3]
local k = jkey(id)
local f = redis.call('HMGET', k, 'account', 'status', 'seq', 'idempotency_key', 'artifacts', 'experiment')
if f[1] ~= acc then return false end
if f[2] == 'queued' then unqueue(id, acc, f[3]) end
if f[6] then redis.call('ZREM', ekey(acc, f[6]), id) end
redis.call('ZREM', P .. ':leases', id)
redis.call('ZREM', skey(acc, f[2]), id)
redis.call('ZREM', P .. ':h:' .. acc, id)
if f[4] and redis.call('HGET', P .. ':idem:' .. acc, f[4]) == id then
  redis.call('HDEL', P .. ':idem:' .. acc, f[4])
end
redis.call('DEL', k)
return f[5] or '{}'
"""

_REQUEUE = _LIB + r"""
local now = ARGV[3]
if now == '' then now = now_str() end
return requeue_expired(now, -1, tonumber(ARGV[2]))
"""

# ARGV: P, index key, start, stop (ZREVRANGE), then the jobs as JSON docs joined into an array
_PAGE = _LIB + r"""
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', ARGV[2], ARGV[3], ARGV[4])) do
  if redis.call('EXISTS', jkey(id)) == 1 then out[#out + 1] = doc(jkey(id)) end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# ARGV: P, account, id: the job's doc, or false when the account has no such job
_GET = _LIB + r"""
local k = jkey(ARGV[3])
if redis.call('HGET', k, 'account') ~= ARGV[2] then return false end
return doc(k)
"""

_PUT_EXPERIMENT = _LIB + r"""
local acc, name = ARGV[2], ARGV[3]
redis.call('HSET', P .. ':exp:' .. acc, name, ARGV[4])
redis.call('ZADD', P .. ':expo:' .. acc, 'NX', redis.call('INCR', P .. ':seq'), name)
"""

_JSON_FIELDS = frozenset({"params", "tags", "artifacts", "timings", "meta"})
_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_FIELD_SET = frozenset(_FIELDS)
_LIST_CHUNK = 200  # jobs fetched per round trip while filtering a history in Python

F = TypeVar("F", bound=Callable[..., Any])


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs for HSET; None is left out (the field keeps its value)."""
    out: list[str] = []
    for name, value in fields.items():
        if value is not None:
            out += (name, _dumps(value) if name in _JSON_FIELDS else str(value))
    return out


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
        )
        reg = client.register_script
        self._enqueue, self._claim, self._owner, self._finish = reg(_ENQUEUE), reg(_CLAIM), reg(_OWNER), reg(_FINISH)
        self._cancel, self._delete, self._requeue = reg(_CANCEL), reg(_DELETE), reg(_REQUEUE)
        self._page, self._get, self._put_experiment = reg(_PAGE), reg(_GET), reg(_PUT_EXPERIMENT)
        self._client, self._pid = client, os.getpid()

    def __reduce__(self) -> tuple[Any, ...]:  # picklable by url: a worker opens its own connection
        return (type(self), (self.url, self.max_attempts))

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

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
        tags: Iterable[str] = (), idempotency_key: str | None = None,
    ) -> JobRecord:
        job = JobRecord(id=new_job_id(), account=account, params=dict(params), priority=int(priority),
                        experiment=experiment, tags=list(tags), idempotency_key=idempotency_key)
        has_key, has_experiment = int(idempotency_key is not None), int(experiment is not None)
        kind, value = self._enqueue(args=[
            self.prefix, account, job.id, has_key, idempotency_key or "", job.priority, _dumps(job.params),
            _dumps(job.tags), has_experiment, experiment or "",
        ])
        if kind == "OLD":
            return _decode(value)
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
        out = self._owner(args=[self.prefix, job_id, str(int(token)), lease, *_pairs(fields)])
        if out[0] == "LOST":
            raise LeaseLost(f"job {job_id}: {out[1]}")
        return out[1] == "1"

    @_guard
    def heartbeat(self, job_id: str, token: int, lease_s: float) -> bool:
        return self._owner_write(job_id, token, lease_s, {})

    @_guard
    def progress(
        self, job_id: str, token: int, *, stage: str, step: int | None = None, total: int | None = None,
        message: str = "",
    ) -> bool:
        fields = {"stage": stage, "step": step, "total_steps": total, "message": message}
        return self._owner_write(job_id, token, None, fields)

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

    # -- history -------------------------------------------------------------------------
    @_guard
    def get(self, account: str, job_id: str) -> JobRecord:
        raw = self._get(args=[self.prefix, account, job_id])
        if not raw:
            raise JobNotFound(f"job {job_id} not found")
        return _decode(raw)

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

    # -- experiments ---------------------------------------------------------------------
    @_guard
    def put_experiment(self, account: str, record: dict[str, Any]) -> None:
        self._put_experiment(args=[self.prefix, account, str(record["name"]), _dumps(record)])

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
