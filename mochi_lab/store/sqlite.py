"""SQLite backend: one WAL file, safe across threads and processes on one machine. Its file, schema and
connections are mochi_lab.store.sqlite_db; its tables beside the jobs, mochi_lab.store.sqlite_side.

Each thread of each process opens its own connection. Every multi-statement write runs in
`BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so claims are atomic
across processes. Owner writes are single `UPDATE ... WHERE fence = ? AND status = 'running'`
statements: a stale token matches no row and changes nothing.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from mochi_lab.model import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    JobNotFound,
    JobRecord,
    LeaseLost,
    check_status,
    new_job_id,
    remove_artifacts,
)
from mochi_lab.private import create_private, private_dir
from mochi_lab.store.base import (
    PROGRESS_LOG_KEEP_S,
    PROGRESS_LOG_MAX,
    QUEUE_LIST_MAX,
    Claim,
    Store,
    active_limit_error,
    check_preview,
    claim_order,
    worker_lost_error,
)
from mochi_lab.store.sqlite_db import COLUMNS, INSERT, JSON_FIELDS, SELECT, SQLiteFile, dumps, log_entry, row_to_job
from mochi_lab.store.sqlite_side import SideTables

# how many expired leases one claim handles before taking a job, so a claim stays cheap
_REQUEUE_BATCH = 100


class SQLiteStore(SideTables, Store):
    """`SQLiteStore("sqlite:///abs/path.sqlite3")`; the file (0600) and its parent dirs (0700) are created."""

    def __init__(self, url: str, max_attempts: int = 3, *, busy_timeout_s: float = 30.0) -> None:
        if not url.startswith("sqlite:///"):
            raise ValueError(f"sqlite store url must look like sqlite:///abs/path, got {url!r}")
        self.url = url
        self.max_attempts = max_attempts
        # "sqlite:///abs" and "sqlite:////abs" (an f-string of an absolute Path) name the same file
        path, _, query = url[len("sqlite://") :].partition("?")
        self.path = Path("/" + path.lstrip("/"))
        self.synchronous = dict(parse_qsl(query)).get("synchronous", "full").upper()
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be full or normal, got {self.synchronous.lower()!r}")
        self._db = SQLiteFile(self.path, synchronous=self.synchronous, busy_timeout_s=busy_timeout_s)
        private_dir(self.path.parent)
        create_private(self.path)  # prompts: the user's alone (its -wal and -shm take its mode)
        self._conn()  # create the file and schema now, so a bad path fails here

    # picklable by url: a worker opens its own connections
    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.url, self.max_attempts))

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its start."""
        return self._db.write()

    def close(self) -> None:
        self._db.close()

    # -- queue ---------------------------------------------------------------------
    def enqueue(
        self, account: str, params: dict[str, Any], *, priority: int = 0, experiment: str | None = None,
        tags: Iterable[str] = (), idempotency_key: str | None = None, max_active: int | None = None,
    ) -> JobRecord:
        job = JobRecord(id=new_job_id(), account=account, params=dict(params), priority=int(priority),
                        experiment=experiment, tags=list(tags), idempotency_key=idempotency_key, created_at=time.time())
        values = [dumps(v) if n in JSON_FIELDS else v for n, v in ((n, getattr(job, n)) for n in COLUMNS)]
        with self._write() as db:
            if idempotency_key is not None:
                old = db.execute(f"{SELECT} WHERE account = ? AND idempotency_key = ?", (account, idempotency_key))
                if (row := old.fetchone()) is not None:
                    return row_to_job(row)
            if max_active is not None:
                (active,) = db.execute("SELECT COUNT(*) FROM jobs WHERE account = ? AND status IN "
                                       "('queued', 'running')", (account,)).fetchone()
                if active >= max_active:
                    raise active_limit_error(account, active, max_active)
            db.execute(INSERT, values)
            db.execute("INSERT OR IGNORE INTO accounts(account) VALUES (?)", (account,))
        return job

    def claim(self, worker_id: str, lease_s: float) -> Claim | None:
        with self._write() as db:
            now = time.time()
            self._requeue_expired(db, now, limit=_REQUEUE_BATCH)
            acct = db.execute(
                "SELECT a.account FROM accounts a WHERE EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.account = a.account AND j.status = 'queued') "
                "ORDER BY a.last_claim, a.account LIMIT 1"
            ).fetchone()
            if acct is None:
                return None
            account = acct[0]
            (seq,) = db.execute(
                "SELECT seq FROM jobs WHERE account = ? AND status = 'queued' ORDER BY priority DESC, seq LIMIT 1",
                (account,),
            ).fetchone()
            row = db.execute(
                "UPDATE jobs SET status = 'running', stage = 'claimed', step = 0, message = '', live = '{}', "
                "attempts = attempts + 1, fence = fence + 1, worker_id = ?, lease_expires_at = ?, "
                f"started_at = COALESCE(started_at, ?) WHERE seq = ? RETURNING {', '.join(COLUMNS)}",
                (worker_id, now + lease_s, now, seq),
            ).fetchone()
            db.execute("UPDATE accounts SET last_claim = (SELECT MAX(last_claim) + 1 FROM accounts) WHERE account = ?",
                       (account,))
        job = row_to_job(row)
        return Claim(job=job, token=job.fence)

    def queued(self, limit: int = QUEUE_LIST_MAX) -> list[JobRecord]:
        rows = self._conn().execute(
            f"SELECT {', '.join(COLUMNS)} FROM (SELECT j.*, a.last_claim, ROW_NUMBER() OVER "
            "(PARTITION BY j.account ORDER BY j.priority DESC, j.seq) AS rank FROM jobs j "
            "JOIN accounts a ON a.account = j.account WHERE j.status = 'queued') "
            "WHERE rank <= ? ORDER BY last_claim, account, rank", (limit,)).fetchall()
        per_account = [[row_to_job(r) for r in group]
                       for _, group in itertools.groupby(rows, key=lambda r: r["account"])]
        return claim_order(per_account, limit)

    def _owner_write(self, job_id: str, token: int, sets: str, args: tuple[Any, ...]) -> bool:
        """Apply `sets` only while `token` owns the running job; returns cancel_requested."""
        conn = self._conn()
        row = conn.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND fence = ? AND status = 'running' RETURNING cancel_requested",
            (*args, job_id, token),
        ).fetchone()
        if row is None:
            now = conn.execute("SELECT status, fence FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if now is None:
                raise LeaseLost(f"job {job_id} no longer exists")
            raise LeaseLost(f"job {job_id}: token {token} lost the lease (now {now[0]}, token {now[1]})")
        return bool(row[0])

    def heartbeat(self, job_id: str, token: int, lease_s: float) -> bool:
        return self._owner_write(job_id, token, "lease_expires_at = ?", (time.time() + lease_s,))

    def progress(
        self, job_id: str, token: int, *, stage: str, step: int | None = None, total: int | None = None,
        message: str = "", live: dict[str, Any] | None = None,
    ) -> bool:
        with self._write() as db:
            cancel = self._owner_write(
                job_id, token,
                "stage = ?, step = COALESCE(?, step), total_steps = COALESCE(?, total_steps), message = ?, "
                "live = COALESCE(?, live)",
                (stage, step, total, message, None if live is None else dumps(live)),
            )
            db.execute(
                "INSERT INTO progress_log(job_id, seq, entry) SELECT id, "
                "(SELECT COUNT(*) FROM progress_log WHERE job_id = ?), json_object('stage', stage, 'step', step, "
                "'total_steps', total_steps, 'message', message, 'attempts', attempts, 'live', json(live)) FROM jobs "
                "WHERE id = ? AND (SELECT COUNT(*) FROM progress_log WHERE job_id = ?) < ?",
                (job_id, job_id, job_id, PROGRESS_LOG_MAX),
            )
        return cancel

    def progress_since(self, account: str, job_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        conn = self._conn()
        self._get(conn, account, job_id)  # JobNotFound for another account's id
        rows = conn.execute(
            "SELECT seq, entry FROM progress_log WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, int(after_seq))
        )
        return [{"seq": seq, "status": RUNNING, **log_entry(entry)} for seq, entry in rows]

    def put_preview(self, job_id: str, token: int, step: int, data: bytes) -> None:
        data = check_preview(data)
        with self._write() as db:
            self._owner_write(job_id, token, "fence = fence", ())
            db.execute("INSERT OR REPLACE INTO previews(job_id, step, data) VALUES (?, ?, ?)", (job_id, int(step), data))

    def get_preview(self, account: str, job_id: str) -> tuple[int, bytes] | None:
        conn = self._conn()
        self._get(conn, account, job_id)  # JobNotFound for another account's id
        row = conn.execute("SELECT step, data FROM previews WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def _finish(
        self, job_id: str, token: int, status: str, *, timings: Any, meta: Any, extra: str = "", args: tuple = ()
    ) -> None:
        # None leaves timings/meta as they were
        self._owner_write(
            job_id, token,
            "status = ?, stage = ?, finished_at = ?, lease_expires_at = NULL, "
            # a cancel request that came too late lost the race: a done or failed job does not keep it
            "cancel_requested = cancel_requested AND ? = 'cancelled', "
            "timings = COALESCE(?, timings), meta = COALESCE(?, meta)" + extra,
            (status, status, time.time(), status, None if timings is None else dumps(timings),
             None if meta is None else dumps(meta), *args),
        )
        # the log holds only running and recent jobs, so this scan stays short
        self._conn().execute(
            "DELETE FROM progress_log WHERE job_id IN (SELECT DISTINCT p.job_id FROM progress_log p "
            "JOIN jobs j ON j.id = p.job_id WHERE j.finished_at < ?)", (time.time() - PROGRESS_LOG_KEEP_S,),
        )

    def complete(
        self, job_id: str, token: int, *, artifacts: dict[str, str], timings: dict[str, float], meta: dict[str, Any]
    ) -> None:
        extra, args = ", artifacts = ?", (dumps(artifacts),)
        with self._write() as db:  # one commit: no reader sees a done job that still has its preview
            self._finish(job_id, token, DONE, timings=timings, meta=meta, extra=extra, args=args)
            db.execute("DELETE FROM previews WHERE job_id = ?", (job_id,))  # the video replaces it

    def fail(
        self, job_id: str, token: int, *, error: str, traceback: str = "", timings: dict[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        extra, args = ", error = ?, traceback = ?", (error, traceback)
        self._finish(job_id, token, FAILED, timings=timings, meta=meta, extra=extra, args=args)

    def finish_cancelled(
        self, job_id: str, token: int, *, timings: dict[str, float] | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        self._finish(job_id, token, CANCELLED, timings=timings, meta=meta)

    def cancel(self, account: str, job_id: str) -> JobRecord:
        with self._write() as db:
            self._get(db, account, job_id)
            db.execute(
                "UPDATE jobs SET status = 'cancelled', stage = 'cancelled', finished_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
            return self._get(db, account, job_id)

    def requeue_expired(self, *, now: float | None = None) -> list[str]:
        """Take back running jobs whose lease expired; returns their ids (requeued, failed or cancelled)."""
        with self._write() as db:
            return self._requeue_expired(db, time.time() if now is None else now, limit=-1)

    def _requeue_expired(self, db: sqlite3.Connection, now: float, *, limit: int) -> list[str]:
        rows = db.execute(
            "SELECT seq, id, attempts, cancel_requested FROM jobs "
            "WHERE status = 'running' AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return self._take_back(db, rows, now)

    def _take_back(self, db: sqlite3.Connection, rows: list, now: float) -> list[str]:
        """Running jobs whose owner is gone: cancelled, failed after the last attempt, else queued again."""
        for seq, _, attempts, cancel_requested in rows:
            if cancel_requested:  # nobody is left to acknowledge the cancel: it is done
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', stage = 'cancelled', finished_at = ?, "
                    "lease_expires_at = NULL WHERE seq = ?", (now, seq),
                )
            elif attempts >= self.max_attempts:
                db.execute(
                    "UPDATE jobs SET status = 'failed', stage = 'failed', finished_at = ?, error = ?, "
                    "lease_expires_at = NULL WHERE seq = ?", (now, worker_lost_error(attempts), seq),
                )
            else:
                db.execute(
                    "UPDATE jobs SET status = 'queued', stage = 'queued', worker_id = NULL, "
                    "lease_expires_at = NULL WHERE seq = ?", (seq,),
                )
        return [row[1] for row in rows]

    def release_worker(self, worker_id: str) -> list[str]:
        """Take back the running jobs of a worker that died or restarted, without waiting out their leases."""
        with self._write() as db:
            rows = db.execute(
                "SELECT seq, id, attempts, cancel_requested FROM jobs WHERE status = 'running' AND worker_id = ? "
                "ORDER BY seq", (worker_id,),
            ).fetchall()
            return self._take_back(db, rows, time.time())

    # -- history ---------------------------------------------------------------------
    def _get(self, db: sqlite3.Connection, account: str, job_id: str) -> JobRecord:
        row = db.execute(f"{SELECT} WHERE id = ? AND account = ?", (job_id, account)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return row_to_job(row)

    def get(self, account: str, job_id: str) -> JobRecord:
        return self._get(self._conn(), account, job_id)

    def list(
        self, account: str, *, status: str | None = None, experiment: str | None = None, tag: str | None = None,
        text: str | None = None, limit: int = 50, offset: int = 0,
    ) -> list[JobRecord]:
        check_status(status)
        where, args = ["account = ?"], [account]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if experiment is not None:
            where.append("experiment = ?")
            args.append(experiment)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(jobs.tags) WHERE json_each.value = ?)")
            args.append(tag)
        if text is not None:
            where.append("mochi_prompt_contains(params, ?)")
            args.append(text)
        rows = self._conn().execute(
            f"{SELECT} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*args, int(limit), int(offset)),
        ).fetchall()
        return [row_to_job(r) for r in rows]

    def delete(self, account: str, job_id: str) -> None:
        # the row is the queue entry too; a running owner's next write raises LeaseLost
        with self._write() as db:
            job = self._get(db, account, job_id)
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM progress_log WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM previews WHERE job_id = ?", (job_id,))
        remove_artifacts(job.artifacts)

    def counts(self, account: str) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn().execute(
            "SELECT status, COUNT(*) FROM jobs WHERE account = ? GROUP BY status", (account,)
        ):
            out[status] = n
        return out

    # -- the pool's controller -------------------------------------------------------------
    def queue_depth(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for account, params, status in self._conn().execute(
                "SELECT account, params, status FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)):
            try:
                model = json.loads(params).get("model")
            except (ValueError, AttributeError):
                model = None
            key = (account, model if isinstance(model, str) else "?", status)
            out[key] = out.get(key, 0) + 1
        return out


__all__ = ["SQLiteStore"]
