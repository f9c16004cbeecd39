"""The SQLite store's file: its schema (and the columns added since the first release), a job's row and
its JobRecord, and connections: one per thread and per process, in WAL mode, with write transactions that
take SQLite's write lock up front."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mochi_lab.model import JobRecord, StoreUnavailable

SCHEMA = """
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

JSON_FIELDS = ("params", "tags", "artifacts", "timings", "meta", "live")
# columns added since the first release: a store file made before gets them on open
ADDED_COLUMNS = {"live": "TEXT NOT NULL DEFAULT '{}'"}
COLUMNS = [f.name for f in dataclasses.fields(JobRecord)]  # the table has the same columns, plus seq
SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
INSERT = f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def row_to_job(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    for name in JSON_FIELDS:
        data[name] = json.loads(data[name])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return JobRecord.from_dict(data)


def log_entry(text: str) -> dict[str, Any]:
    entry = json.loads(text)
    if not entry.get("live"):  # as the Redis log: no live figures, no key
        entry.pop("live", None)
    return entry


def prompt_contains(params: str, text: str) -> bool:
    # Python's casefold, not SQLite's ASCII-only lower(): same answer as the Redis backend
    prompt = json.loads(params).get("prompt", "")
    return text.casefold() in str(prompt).casefold()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SQLiteFile:
    """Connections to one SQLite file; the first one makes the schema."""

    def __init__(self, path: Path, *, synchronous: str, busy_timeout_s: float) -> None:
        self.path, self.synchronous, self.busy_timeout_s = path, synchronous, busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._schema_ready = False

    def conn(self) -> sqlite3.Connection:
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
        conn.create_function("mochi_prompt_contains", 2, prompt_contains, deterministic=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        self._set_wal(conn)
        # FULL: a returned write survives a power cut too. NORMAL (?synchronous=normal, ~4x faster)
        # survives a killed process, but a power cut may roll back the last commits
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if not self._schema_ready:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
                for name, decl in ADDED_COLUMNS.items():
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
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its start."""
        conn = self.conn()
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
