"""Crashes and outages: SIGKILLed Redis and SQLite writers lose nothing they acknowledged."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mochi_lab.model import DONE, QUEUED, RUNNING, STATUSES, StoreUnavailable
from mochi_lab.store import open_store
from mochi_lab.store.redis import RedisStore
from tests.support.store_helpers import RedisServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def test_redis_keeps_every_acknowledged_enqueue_across_sigkill(own_redis: RedisServer) -> None:
    store = open_store(f"{own_redis.url}?prefix=durable")
    ids = [store.enqueue(f"acct{i % 3}", {"prompt": f"job {i}", "i": i}, idempotency_key=f"k{i}").id
           for i in range(200)]
    claims = [store.claim("w1", 600) for _ in range(10)]
    own_redis.kill()
    own_redis.start()  # same port, same dir: replays the fsync-always AOF
    for i, job_id in enumerate(ids):
        job = store.get(f"acct{i % 3}", job_id)
        assert job.params == {"prompt": f"job {i}", "i": i}
    for claim in claims:
        job = store.get(claim.job.account, claim.job.id)
        assert (job.status, job.fence, job.worker_id) == (RUNNING, claim.token, "w1")
        store.complete(job.id, claim.token, artifacts={}, timings={}, meta={})  # the lease survived too
    assert sum(store.counts(f"acct{a}")[QUEUED] for a in range(3)) == 190
    assert store.enqueue("acct0", {"prompt": "dup"}, idempotency_key="k0").id == ids[0]
    rest = {c.job.id for c in iter(lambda: store.claim("w2", 60), None)}
    assert rest == set(ids) - {c.job.id for c in claims}
    store.close()


def test_redis_outage_raises_store_unavailable_then_recovers(own_redis: RedisServer) -> None:
    store = open_store(f"{own_redis.url}?prefix=outage")
    job = store.enqueue("alice", {"prompt": "before"})
    own_redis.kill()
    for call in (lambda: store.get("alice", job.id), lambda: store.claim("w", 30),
                 lambda: store.enqueue("alice", {"prompt": "during"})):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{own_redis.port}"):
            call()
        assert time.monotonic() - began < 10
    own_redis.start()
    assert store.get("alice", job.id).params == {"prompt": "before"}  # the same object reconnects
    assert store.claim("w", 30).job.id == job.id
    store.close()


def test_hung_redis_times_out_instead_of_hanging(own_redis: RedisServer) -> None:
    # a stopped server still accepts connections but never answers; the url's socket_timeout
    # reaches redis-py (the prefix parameter is the only one the store strips)
    store = open_store(f"{own_redis.url}?prefix=hung&socket_timeout=1")
    job = store.enqueue("alice", {"prompt": "p"})
    own_redis.pause()
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("alice", job.id)
        assert time.monotonic() - began < 5
    finally:
        own_redis.resume()
    assert store.get("alice", job.id).id == job.id
    store.close()


def test_redis_keys_stay_under_the_prefix(own_redis: RedisServer, tmp_path: Path) -> None:
    store = open_store(f"{own_redis.url}?prefix=mine")
    assert isinstance(store, RedisStore) and store.prefix == "mine"
    job = store.enqueue("alice", {"prompt": "p"}, idempotency_key="k", experiment="e", tags=["t"])
    claim = store.claim("w", 30)
    store.complete(job.id, claim.token, artifacts={}, timings={}, meta={})
    store.put_worker({"worker_id": "w"}, 30)
    store.put_experiment("alice", {"name": "e"})
    keys = store.client.keys("*")
    assert keys and all(k.startswith("mine:") for k in keys)
    assert store.drop_all() == len(keys) and store.client.keys("*") == []
    store.close()


def test_redis_delete_leaves_no_job_keys_behind(own_redis: RedisServer, tmp_path: Path) -> None:
    store = open_store(f"{own_redis.url}?prefix=clean")
    jobs = [store.enqueue("a:b", {"prompt": str(i)}, experiment="e:1", tags=["t"], idempotency_key=f"k{i}")
            for i in range(4)]
    claims = [store.claim("w", 30) for _ in range(3)]
    store.complete(claims[0].job.id, claims[0].token, artifacts={}, timings={}, meta={})
    store.fail(claims[1].job.id, claims[1].token, error="x")  # claims[2] stays running, jobs[3] queued
    for job in jobs:
        store.delete("a:b", job.id)
    # only counters survive: no job, queue, lease, index or idempotency entry
    assert sorted(store.client.keys("*")) == ["clean:claimseq", "clean:lastclaim", "clean:seq"]
    store.close()


def test_sqlite_survives_a_sigkilled_writer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash' / 'store.sqlite3'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen(
        [sys.executable, str(Path(__file__).parents[1] / "support" / "store_helpers.py"), "sqlite_writer", url],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    acknowledged: dict[str, int] = {}
    try:
        assert writer.stdout is not None
        deadline = time.monotonic() + 30
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            job_id, i = line.split()
            acknowledged[job_id] = int(i)
    finally:
        writer.send_signal(signal.SIGKILL)  # mid-run: it never stops writing on its own
        writer.wait(10)
    assert len(acknowledged) >= 300, "the writer did not get going"

    path = tmp_path / "crash" / "store.sqlite3"
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        columns = "params, status, fence, worker_id, lease_expires_at, finished_at"
        rows = raw.execute(f"SELECT {columns} FROM jobs").fetchall()
    assert len(rows) >= len(acknowledged)
    for params, status, fence, worker_id, lease, finished in rows:  # no half-written job
        assert json.loads(params)["pad"] == "x" * 2000 and status in STATUSES
        if status == RUNNING:
            assert fence >= 1 and worker_id and lease
        if status == DONE:
            assert finished is not None
    store = open_store(url)
    for job_id, i in acknowledged.items():
        assert store.get("acct", job_id).params["i"] == i
    assert store.claim("after", 60) is not None  # and it keeps working
    store.close()


def test_sqlite_completes_a_job_and_drops_its_preview_in_one_commit(tmp_path: Path) -> None:
    """A reader never sees a done job that still has its preview. Looked at from a second connection at the
    moment the store's own connection prepares the preview's DELETE, i.e. after the job's UPDATE ran."""
    store, reader = open_store(f"sqlite:///{tmp_path / 'jobs.db'}"), open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = store.enqueue("alice", {"prompt": "one"})
    claim = store.claim("w", 60)
    store.put_preview(job.id, claim.token, 3, b"RIFF\x00look")
    seen: list[tuple[str, object]] = []

    def authorizer(action: int, table: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_DELETE and table == "previews":
            seen.append((reader.get("alice", job.id).status, reader.get_preview("alice", job.id)))
        return sqlite3.SQLITE_OK

    store._conn().set_authorizer(authorizer)
    try:
        store.complete(job.id, claim.token, artifacts={"video": "v.mp4"}, timings={}, meta={})
    finally:
        store._conn().set_authorizer(None)
    assert seen == [(RUNNING, (3, b"RIFF\x00look"))]  # mid-commit: the reader still sees the running job whole
    assert reader.get("alice", job.id).status == DONE and reader.get_preview("alice", job.id) is None
