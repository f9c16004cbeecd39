"""SQLite backend: one WAL file, safe across threads and processes on one machine.

Each thread of each process opens its own connection. Every multi-statement write runs in
`BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so claims are atomic
across processes. Owner writes are single `UPDATE ... WHERE fence = ? AND status = 'running'`
statements: a stale token matches no row and changes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    StoreUnavailable,
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
    experiments_limit_error,
    worker_lost_error,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: FIFO and newest-first
    id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    live TEXT NOT NULL DEFAULT '{}',
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    experiment TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker_id TEXT,
    lease_expires_at REAL,
    fence INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    artifacts TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    meta TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    traceback TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(account, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(account, status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_history ON jobs(account, seq);
-- last_claim is a claim counter (not a clock): the account served longest ago goes next
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    last_claim INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    expires_at REAL NOT NULL
);
-- every progress write of a job, in order, dropped with the job or a while after it ends
CREATE TABLE IF NOT EXISTS progress_log (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS previews (
    job_id TEXT PRIMARY KEY,
    step INTEGER NOT NULL,
    data BLOB NOT NULL
);
-- one holder per role (the pool's controller), until its time runs out
CREATE TABLE IF NOT EXISTS leaders (
    role TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
-- the gateway's web sessions and pending logins (Store.put_session)
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions(expires_at);
CREATE TABLE IF NOT EXISTS experiments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    name TEXT NOT NULL,
    record TEXT NOT NULL,
    UNIQUE(account, name)
);
"""

_JSON_FIELDS = ("params", "tags", "artifacts", "timings", "meta", "live")
# columns added since the first release: a store file made before gets them on open
_ADDED_COLUMNS = {"live": "TEXT NOT NULL DEFAULT '{}'"}
_COLUMNS = [f.name for f in dataclasses.fields(JobRecord)]  # the table has the same columns, plus seq
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_INSERT = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# how many expired leases one claim handles before taking a job, so a claim stays cheap
_REQUEUE_BATCH = 100


def _row_to_job(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    for name in _JSON_FIELDS:
        data[name] = json.loads(data[name])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return JobRecord.from_dict(data)


def _entry(text: str) -> dict[str, Any]:
    entry = json.loads(text)
    if not entry.get("live"):  # as the Redis log: no live figures, no key
        entry.pop("live", None)
    return entry


def _prompt_contains(params: str, text: str) -> bool:
    # Python's casefold, not SQLite's ASCII-only lower(): same answer as the Redis backend
    prompt = json.loads(params).get("prompt", "")
    return text.casefold() in str(prompt).casefold()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SQLiteStore(Store):
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
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._schema_ready = False
        private_dir(self.path.parent)
        create_private(self.path)  # prompts: the user's alone (its -wal and -shm take its mode)
        self._conn()  # create the file and schema now, so a bad path fails here

    # picklable by url: a worker opens its own connections
    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.url, self.max_attempts))

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    # -- connections -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # a connection must not cross a fork; open a fresh one per thread and per process
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        conn.create_function("mochi_prompt_contains", 2, _prompt_contains, deterministic=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        self._set_wal(conn)
        # FULL: a returned write survives a power cut too. NORMAL (?synchronous=normal, ~4x faster)
        # survives a killed process, but a power cut may roll back the last commits
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if not self._schema_ready:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
                for name, decl in _ADDED_COLUMNS.items():
                    if name not in have:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._schema_ready = True
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._all.append(conn)
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # switching the journal mode can meet a lock that the busy handler does not wait for
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its start."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite store {self.path} is locked: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # -- queue ---------------------------------------------------------------------
    def enqueue(
        self, account: str, params: dict[str, Any], *, priority: int = 0, experiment: str | None = None,
        tags: Iterable[str] = (), idempotency_key: str | None = None, max_active: int | None = None,
    ) -> JobRecord:
        job = JobRecord(id=new_job_id(), account=account, params=dict(params), priority=int(priority),
                        experiment=experiment, tags=list(tags), idempotency_key=idempotency_key, created_at=time.time())
        values = [_dumps(v) if n in _JSON_FIELDS else v for n, v in ((n, getattr(job, n)) for n in _COLUMNS)]
        with self._write() as db:
            if idempotency_key is not None:
                old = db.execute(f"{_SELECT} WHERE account = ? AND idempotency_key = ?", (account, idempotency_key))
                if (row := old.fetchone()) is not None:
                    return _row_to_job(row)
            if max_active is not None:
                (active,) = db.execute("SELECT COUNT(*) FROM jobs WHERE account = ? AND status IN "
                                       "('queued', 'running')", (account,)).fetchone()
                if active >= max_active:
                    raise active_limit_error(account, active, max_active)
            db.execute(_INSERT, values)
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
                f"started_at = COALESCE(started_at, ?) WHERE seq = ? RETURNING {', '.join(_COLUMNS)}",
                (worker_id, now + lease_s, now, seq),
            ).fetchone()
            db.execute("UPDATE accounts SET last_claim = (SELECT MAX(last_claim) + 1 FROM accounts) WHERE account = ?",
                       (account,))
        job = _row_to_job(row)
        return Claim(job=job, token=job.fence)

    def queued(self, limit: int = QUEUE_LIST_MAX) -> list[JobRecord]:
        rows = self._conn().execute(
            f"SELECT {', '.join(_COLUMNS)} FROM (SELECT j.*, a.last_claim, ROW_NUMBER() OVER "
            "(PARTITION BY j.account ORDER BY j.priority DESC, j.seq) AS rank FROM jobs j "
            "JOIN accounts a ON a.account = j.account WHERE j.status = 'queued') "
            "WHERE rank <= ? ORDER BY last_claim, account, rank", (limit,)).fetchall()
        per_account = [[_row_to_job(r) for r in group]
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
                (stage, step, total, message, None if live is None else _dumps(live)),
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
        return [{"seq": seq, "status": RUNNING, **_entry(entry)} for seq, entry in rows]

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
            (status, status, time.time(), status, None if timings is None else _dumps(timings),
             None if meta is None else _dumps(meta), *args),
        )
        # the log holds only running and recent jobs, so this scan stays short
        self._conn().execute(
            "DELETE FROM progress_log WHERE job_id IN (SELECT DISTINCT p.job_id FROM progress_log p "
            "JOIN jobs j ON j.id = p.job_id WHERE j.finished_at < ?)", (time.time() - PROGRESS_LOG_KEEP_S,),
        )

    def complete(
        self, job_id: str, token: int, *, artifacts: dict[str, str], timings: dict[str, float], meta: dict[str, Any]
    ) -> None:
        extra, args = ", artifacts = ?", (_dumps(artifacts),)
        self._finish(job_id, token, DONE, timings=timings, meta=meta, extra=extra, args=args)
        self._conn().execute("DELETE FROM previews WHERE job_id = ?", (job_id,))  # the video replaces it

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
        row = db.execute(f"{_SELECT} WHERE id = ? AND account = ?", (job_id, account)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        return _row_to_job(row)

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
            f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*args, int(limit), int(offset)),
        ).fetchall()
        return [_row_to_job(r) for r in rows]

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

    # -- workers -----------------------------------------------------------------------
    def put_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        self._conn().execute(
            "INSERT INTO workers(worker_id, info, expires_at) VALUES (?, ?, ?) ON CONFLICT(worker_id) "
            "DO UPDATE SET info = excluded.info, expires_at = excluded.expires_at",
            (info["worker_id"], _dumps(info), time.time() + ttl_s),
        )

    def workers(self) -> list[dict[str, Any]]:
        conn = self._conn()
        now = time.time()
        conn.execute("DELETE FROM workers WHERE expires_at <= ?", (now,))
        rows = conn.execute("SELECT info FROM workers WHERE expires_at > ? ORDER BY worker_id", (now,))
        return [json.loads(r[0]) for r in rows]

    def remove_worker(self, worker_id: str) -> None:
        self._conn().execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

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

    def lead(self, role: str, holder: str, ttl_s: float, *, take: bool = False) -> bool:
        with self._write() as conn:
            now = time.time()
            row = conn.execute("SELECT holder, until FROM leaders WHERE role = ?", (role,)).fetchone()
            if row is not None and not take and row[0] != holder and row[1] > now:
                return False
            conn.execute("INSERT INTO leaders(role, holder, until) VALUES (?, ?, ?) ON CONFLICT(role) "
                         "DO UPDATE SET holder = excluded.holder, until = excluded.until", (role, holder, now + ttl_s))
            return True

    # -- the gateway's web sign-in ---------------------------------------------------------
    def put_session(self, key: str, data: dict[str, Any], ttl_s: float) -> None:
        with self._write() as conn:
            now = time.time()
            conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))  # the ended ones go here
            conn.execute("INSERT OR REPLACE INTO sessions(key, data, expires_at) VALUES (?, ?, ?)",
                         (key, _dumps(data), now + ttl_s))

    def get_session(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT data FROM sessions WHERE key = ? AND expires_at > ?",
                                   (key, time.time())).fetchone()
        return None if row is None else json.loads(row[0])

    def take_session(self, key: str) -> dict[str, Any] | None:
        with self._write() as conn:
            row = conn.execute("SELECT data, expires_at FROM sessions WHERE key = ?", (key,)).fetchone()
            conn.execute("DELETE FROM sessions WHERE key = ?", (key,))
        return None if row is None or row[1] <= time.time() else json.loads(row[0])

    # -- experiments -----------------------------------------------------------------------
    def put_experiment(self, account: str, record: dict[str, Any], *, max_count: int | None = None) -> None:
        with self._write() as conn:
            if max_count is not None and conn.execute(
                    "SELECT 1 FROM experiments WHERE account = ? AND name = ?", (account, record["name"])).fetchone() is None:
                count = conn.execute("SELECT COUNT(*) FROM experiments WHERE account = ?", (account,)).fetchone()[0]
                if count >= max_count:
                    raise experiments_limit_error(account, count, max_count)
            conn.execute(
                "INSERT INTO experiments(account, name, record) VALUES (?, ?, ?) "
                "ON CONFLICT(account, name) DO UPDATE SET record = excluded.record",
                (account, record["name"], _dumps(record)),
            )

    def get_experiment(self, account: str, name: str) -> dict[str, Any]:
        row = self._conn().execute(
            "SELECT record FROM experiments WHERE account = ? AND name = ?", (account, name)
        ).fetchone()
        if row is None:
            raise KeyError(f"experiment {name!r} not found")
        return json.loads(row[0])

    def list_experiments(self, account: str) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT record FROM experiments WHERE account = ? ORDER BY seq DESC", (account,))
        return [json.loads(r[0]) for r in rows]


__all__ = ["SQLiteStore"]
