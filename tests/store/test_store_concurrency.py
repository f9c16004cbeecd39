"""Many processes claiming from one store: every job is claimed exactly once."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections import Counter

import pytest

from mochi_lab.model import DONE
from mochi_lab.store import Store
from mochi_lab.store.redis import RedisStore
from tests.support.store_helpers import claim_all, enqueue_under_quota

PROCESSES = 8
JOBS = 500


def test_processes_claim_each_job_exactly_once(store: Store) -> None:
    ids = {store.enqueue(f"acct{i % 5}", {"prompt": f"job {i}"}).id for i in range(JOBS)}
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()  # all begin claiming together, once all are up
    procs = [ctx.Process(target=claim_all, args=(store.url, f"w{i}", start, out)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=90))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    claimed = Counter(job_id for _, got in results for job_id, _ in got)
    assert set(claimed) == ids
    assert max(claimed.values()) == 1
    assert all(token == 1 for _, got in results for _, token in got)
    # every process did real work (otherwise the test proves nothing about contention)
    assert all(got for _, got in results)
    by_worker = {w: {j for j, _ in got} for w, got in results}
    for account in (f"acct{i}" for i in range(5)):
        for job in store.list(account, limit=JOBS):
            assert (job.status, job.attempts, job.fence) == (DONE, 1, 1)
            assert job.id in by_worker[job.meta["by"]] and job.worker_id == job.meta["by"]


def test_threads_share_one_store_object(store: Store) -> None:
    ids = {store.enqueue("alice", {"prompt": str(i)}).id for i in range(200)}
    got: queue.Queue[str] = queue.Queue()

    def work(name: str) -> None:
        while (claim := store.claim(name, 60)) is not None:
            got.put(claim.job.id)
            store.complete(claim.job.id, claim.token, artifacts={}, timings={}, meta={})

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [got.get_nowait() for _ in range(got.qsize())]
    assert sorted(claimed) == sorted(ids)
    assert store.counts("alice")[DONE] == 200


def _connection_identity(store: Store) -> int:
    if isinstance(store, RedisStore):
        return store._client.client_id()  # the connection the last call used (no reconnect)
    return id(store._conn())  # type: ignore[attr-defined]


def _enqueue_in_child(store: Store, out) -> None:
    job = store.enqueue("alice", {"prompt": "from the child"})
    out.put((job.id, _connection_identity(store)))


def test_a_forked_child_opens_its_own_connection(store: Store) -> None:
    first = store.enqueue("alice", {"prompt": "from the parent"})  # the parent is connected now
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_enqueue_in_child, args=(store, out))
    child.start()
    child_id, child_connection = out.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert child_connection != _connection_identity(store)
    # the parent's connection was not disturbed by the child's traffic
    assert store.get("alice", child_id).params == {"prompt": "from the child"}
    assert [j.id for j in store.list("alice")] == [child_id, first.id]


def test_the_active_jobs_quota_holds_across_processes(store: Store) -> None:
    """Like gateway replicas: 4 processes race to queue 10 jobs each under max_active=7; exactly 7 get in."""
    from mochi_lab.model import QuotaExceeded

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=enqueue_under_quota, args=(store.url, 10, 7, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    queued = [i for ids, _ in results for i in ids]
    assert len(queued) == 7 and sum(refused for _, refused in results) == 33
    assert store.counts("alice")["queued"] == 7
    with pytest.raises(QuotaExceeded, match="max_active_jobs=7"):
        store.enqueue("alice", {"prompt": "one more"}, max_active=7)
    store.enqueue("bob", {"prompt": "another account"}, max_active=7)  # per account
    store.enqueue("alice", {"prompt": "k"}, idempotency_key="k")  # no quota asked: none applied
    assert store.enqueue("alice", {"prompt": "k"}, idempotency_key="k", max_active=1).params["prompt"] == "k"
    claim = store.claim("w", 60)  # running counts too; finished does not
    assert claim.job.account == "alice"  # accounts tie: the first by name goes first
    store.complete(claim.job.id, claim.token, artifacts={}, timings={}, meta={})
    store.cancel("alice", next(i for i in queued if i != claim.job.id))
    store.enqueue("alice", {"prompt": "room again"}, max_active=7)  # 8 active - 2 finished = 6
    with pytest.raises(QuotaExceeded):
        store.enqueue("alice", {"prompt": "full again"}, max_active=7)

