"""The Redis store's connection: its URL and key prefix, one connection per process (a forked child opens its
own), the Lua scripts registered on it (redis_lua.py), and `guard`, which turns a lost connection into
StoreUnavailable. Part of `RedisStore` (mochi_lab.store.redis).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mochi_lab.model import StoreUnavailable
from mochi_lab.store import redis_lua as lua

F = TypeVar("F", bound=Callable[..., Any])
# No CLIENT SETINFO on connect: least-privilege ACL users are not granted it (cluster/k8s/base/redis.yaml).
# redis-py 8 takes driver_info; older versions lib_name/lib_version.
_NO_SETINFO = ({"driver_info": None} if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
               else {"lib_name": None, "lib_version": None})


def dumps(value: Any) -> str:
    """Compact JSON, as the scripts store it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def guard(method: F) -> F:
    """Turn a lost connection into StoreUnavailable; the next call reconnects."""

    @functools.wraps(method)
    def wrapper(self: RedisConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._pid != os.getpid():  # first use, or a forked child: never share a parent's socket
                self._connect()
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis store at {self.where} is unavailable: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class RedisConnection:
    """`RedisConnection("redis://host:port/db?prefix=name")`: every key lives under `name:`."""

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
        return f"{type(self).__name__}({where!r}, prefix={self.prefix!r})"

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def close(self) -> None:
        if self._pid == os.getpid():
            self._client.close()
        self._pid = None

    @guard
    def drop_all(self) -> int:
        """Delete every key under this store's prefix (tests, benchmarks); returns how many."""
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
        keys = list(self.client.scan_iter(match=pattern, count=1000))
        return sum(self.client.delete(*keys[i : i + 1000]) for i in range(0, len(keys), 1000))


__all__ = ["RedisConnection", "dumps", "guard"]
