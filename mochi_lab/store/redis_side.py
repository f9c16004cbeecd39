"""The Redis store's keys beside the jobs: worker rows, the pool controller's queue depth and leaders, the
gateway's web sessions, and experiments. Part of `RedisStore` (mochi_lab.store.redis).
"""

from __future__ import annotations

import json
from typing import Any

from mochi_lab.store.base import experiments_limit_error
from mochi_lab.store.redis_conn import RedisConnection, dumps, guard


class SideKeys(RedisConnection):
    """Workers, leaders, sessions and experiments, under the store's prefix."""

    # -- workers -------------------------------------------------------------------------
    @guard
    def put_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        worker_id = str(info["worker_id"])
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key("worker", worker_id), dumps(info), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(self._key("workers"), worker_id)
        pipe.execute()

    @guard
    def workers(self) -> list[dict[str, Any]]:
        ids = sorted(self.client.smembers(self._key("workers")))
        rows = self.client.mget([self._key("worker", i) for i in ids]) if ids else []
        gone = [i for i, row in zip(ids, rows) if row is None]
        if gone:  # their TTL ran out: forget them
            self.client.srem(self._key("workers"), *gone)
        return [json.loads(row) for row in rows if row is not None]

    @guard
    def remove_worker(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key("worker", worker_id))
        pipe.srem(self._key("workers"), worker_id)
        pipe.execute()

    # -- the pool's controller -----------------------------------------------------------
    @guard
    def queue_depth(self) -> dict[tuple[str, str, str], int]:
        flat = self._queue_depth(args=[self.prefix])
        return {(flat[i], flat[i + 1], flat[i + 2]): int(flat[i + 3]) for i in range(0, len(flat), 4)}

    @guard
    def lead(self, role: str, holder: str, ttl_s: float, *, take: bool = False) -> bool:
        return self._lead(args=[self.prefix, role, holder, f"{ttl_s:.3f}", "1" if take else "0"]) == 1

    # -- the gateway's web sign-in -------------------------------------------------------
    @guard
    def put_session(self, key: str, data: dict[str, Any], ttl_s: float) -> None:
        self.client.set(self._key("sess", key), dumps(data), px=max(1, int(ttl_s * 1000)))

    @guard
    def get_session(self, key: str) -> dict[str, Any] | None:
        (raw,) = self.client.mget([self._key("sess", key)])  # MGET: the store users' ACL has no GET
        return None if raw is None else json.loads(raw)

    @guard
    def take_session(self, key: str) -> dict[str, Any] | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.mget([self._key("sess", key)])
        pipe.delete(self._key("sess", key))
        (raw,), _ = pipe.execute()  # MULTI: of concurrent takes, one reads it before it goes
        return None if raw is None else json.loads(raw)

    # -- experiments ---------------------------------------------------------------------
    @guard
    def put_experiment(self, account: str, record: dict[str, Any], *, max_count: int | None = None) -> None:
        count = self._put_experiment(args=[self.prefix, account, str(record["name"]), dumps(record),
                                           "" if max_count is None else int(max_count)])
        if count is not None:
            raise experiments_limit_error(account, int(count), int(max_count))

    @guard
    def get_experiment(self, account: str, name: str) -> dict[str, Any]:
        raw = self.client.hget(self._key("exp", account), name)
        if raw is None:
            raise KeyError(f"experiment {name!r} not found")
        return json.loads(raw)

    @guard
    def list_experiments(self, account: str) -> list[dict[str, Any]]:
        names = self.client.zrevrange(self._key("expo", account), 0, -1)
        rows = self.client.hmget(self._key("exp", account), names) if names else []
        return [json.loads(r) for r in rows if r is not None]


__all__ = ["SideKeys"]
