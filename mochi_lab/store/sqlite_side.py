"""The SQLite store's tables beside the jobs: worker rows, the leader of each role, the gateway's web sessions
and experiments. Part of `SQLiteStore` (mochi_lab.store.sqlite)."""

from __future__ import annotations

import json
import time
from typing import Any

from mochi_lab.store.base import experiments_limit_error
from mochi_lab.store.sqlite_db import SQLiteFile, dumps


class SideTables:
    """Workers, leaders, sessions and experiments, in the store's file (`_db`)."""

    _db: SQLiteFile

    # -- workers -----------------------------------------------------------------------
    def put_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        self._db.conn().execute(
            "INSERT INTO workers(worker_id, info, expires_at) VALUES (?, ?, ?) ON CONFLICT(worker_id) "
            "DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at",
            (info["worker_id"], dumps(info), time.time() + ttl_s),
        )

    def workers(self) -> list[dict[str, Any]]:
        conn = self._db.conn()
        now = time.time()
        conn.execute("DELETE FROM workers WHERE expires_at <= ?", (now,))
        rows = conn.execute("SELECT info FROM workers WHERE expires_at > ? ORDER BY worker_id", (now,))
        return [json.loads(r[0]) for r in rows]

    def remove_worker(self, worker_id: str) -> None:
        self._db.conn().execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    # -- the pool's controller's leader ---------------------------------------------------
    def lead(self, role: str, holder: str, ttl_s: float, *, take: bool = False) -> bool:
        with self._db.write() as conn:
            now = time.time()
            row = conn.execute("SELECT holder, until FROM leaders WHERE role = ?", (role,)).fetchone()
            if row is not None and not take and row[0] != holder and row[1] > now:
                return False
            conn.execute("INSERT INTO leaders(role, holder, until) VALUES (?, ?, ?) ON CONFLICT(role) "
                         "DO UPDATE SET holder = excluded.holder, until = excluded.until", (role, holder, now + ttl_s))
            return True

    # -- the gateway's web sign-in ---------------------------------------------------------
    def put_session(self, key: str, data: dict[str, Any], ttl_s: float) -> None:
        with self._db.write() as conn:
            now = time.time()
            conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))  # the ended ones go here
            conn.execute("INSERT OR REPLACE INTO sessions(key, data, expires_at) VALUES (?, ?, ?)",
                         (key, dumps(data), now + ttl_s))

    def get_session(self, key: str) -> dict[str, Any] | None:
        row = self._db.conn().execute("SELECT data FROM sessions WHERE key = ? AND expires_at > ?",
                                   (key, time.time())).fetchone()
        return None if row is None else json.loads(row[0])

    def take_session(self, key: str) -> dict[str, Any] | None:
        with self._db.write() as conn:
            row = conn.execute("SELECT data, expires_at FROM sessions WHERE key = ?", (key,)).fetchone()
            conn.execute("DELETE FROM sessions WHERE key = ?", (key,))
        return None if row is None or row[1] <= time.time() else json.loads(row[0])

    # -- experiments -----------------------------------------------------------------------
    def put_experiment(self, account: str, record: dict[str, Any], *, max_count: int | None = None) -> None:
        with self._db.write() as conn:
            if max_count is not None and conn.execute(
                    "SELECT 1 FROM experiments WHERE account = ? AND name = ?", (account, record["name"])).fetchone() is None:
                count = conn.execute("SELECT COUNT(*) FROM experiments WHERE account = ?", (account,)).fetchone()[0]
                if count >= max_count:
                    raise experiments_limit_error(account, count, max_count)
            conn.execute(
                "INSERT INTO experiments(account, name, record) VALUES (?, ?, ?) "
                "ON CONFLICT(account, name) DO UPDATE SET record = excluded.record",
                (account, record["name"], dumps(record)),
            )

    def get_experiment(self, account: str, name: str) -> dict[str, Any]:
        row = self._db.conn().execute(
            "SELECT record FROM experiments WHERE account = ? AND name = ?", (account, name)
        ).fetchone()
        if row is None:
            raise KeyError(f"experiment {name!r} not found")
        return json.loads(row[0])

    def list_experiments(self, account: str) -> list[dict[str, Any]]:
        rows = self._db.conn().execute("SELECT record FROM experiments WHERE account = ? ORDER BY seq DESC", (account,))
        return [json.loads(r[0]) for r in rows]

