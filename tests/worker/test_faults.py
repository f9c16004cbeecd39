"""Workers survive their dependencies (DESIGN contract 10): store outages, dead loops, ignored cancels.

Real processes: a private redis-server with an fsync-always AOF, SIGKILLed and restarted on the same
port and dir (those tests are fault injection, the e2e tier); the worker runs in a thread of the test
process (it knows nothing of Ray), so the wedged loop, the max run time, the ignored cancel and the
restarted worker are fast-tier tests. A fault lands mid-denoise by holding the job at a gate; a step that
never returns (a hung kernel) is `hung_steps`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from mochi_lab.config import Settings
from mochi_lab.model import DONE, StoreError
from mochi_lab.params import GenerationParams
from mochi_lab.store import open_store
from mochi_lab.worker.loop import Worker, WorkerUnhealthy
from tests.support.faults_helpers import RedisServer, hung_steps, wait_for
from tests.support.tools import need_tool


def _settings(tmp_path: Path, store_url: str, tiny_checkpoint: Path, **over) -> Settings:
    base = {"data_dir": tmp_path / "data", "cache_dir": tiny_checkpoint.parent, "redis_url": store_url,
            "poll_s": 0.01, "worker_ttl_s": 3.0, "lease_s": 10.0,
            "test_gates": Path(os.environ["MOCHI_LAB_TEST_GATES"])}  # the `hold` fixture's gates
    return Settings(**{**base, **over})


def _snapshot(store, account: str, ids: list[str]):
    try:
        return {i: (j.status, j.step) for i in ids for j in [store.get(account, i)]}
    except StoreError:
        return None


@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("outage_s, lease_s, runs_through", [(3, 10.0, False), (20, 4.0, True)],
                         ids=["3s-outage", "20s-outage"])
def test_worker_rides_out_a_redis_outage(tmp_path, tiny_checkpoint, tiny, hold, outage_s, lease_s, runs_through):
    """The long job is held at step 3 when Redis dies. The 3 s outage ends with it still held there (it
    goes on once the store is back); through the 20 s one (5 leases) it is released at once and runs its
    remaining steps, decode and encode with the store down, its completion waiting for the store."""
    need_tool("redis-server")
    server = RedisServer(tmp_path / "redis").start()
    url = f"{server.url}?prefix=faults-{uuid.uuid4().hex[:8]}"
    settings = _settings(tmp_path, url, tiny_checkpoint, lease_s=lease_s)
    gate = hold("a long river, held at step 3", step=3)
    store = open_store(url)
    long_job = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=1,
                                                             **{**tiny, "num_inference_steps": 100}).to_dict())
    short = [store.enqueue("alice", GenerationParams.parse("a cat", seed=i, **tiny).to_dict()).id for i in range(3)]
    ids = [long_job.id, *short]
    warnings = _Records(logging.WARNING)
    logging.getLogger("mochi_lab.worker").addHandler(warnings)
    worker = Worker("w-fault", settings)
    worker.start()
    try:
        gate.wait_reached()
        server.kill()
        killed = time.monotonic()
        if runs_through:
            gate.release()
            video = settings.artifacts_dir / "alice" / f"{long_job.id}.png"  # written after the MP4
            wait_for(video.exists, 120, "the long job's files, written while the store is down")
        time.sleep(max(0.0, killed + outage_s - time.monotonic()))  # the outage's length
        assert worker._thread.is_alive()
        server.start()  # same port and dir: the AOF comes back
        up = time.monotonic()
        before = wait_for(lambda: _snapshot(store, "alice", ids), 10, "the store to answer again")
        gate.release()
        wait_for(lambda: (snap := _snapshot(store, "alice", ids)) is not None and snap != before, 60,
                 "the first progress or completion after the restart")
        recovery_s = time.monotonic() - up
        wait_for(lambda: store.counts("alice")[DONE] == len(ids), 120, "every job done")
        done_s = time.monotonic() - up
        records = [store.get("alice", i) for i in ids]
        assert [r.status for r in records] == [DONE] * len(ids)
        assert [r.attempts for r in records] == [1] * len(ids)  # one worker: nobody else took its lease
        assert all(r.cancel_requested is False and r.error is None for r in records)
        files = sorted(p.name for p in (settings.artifacts_dir / "alice").iterdir())
        assert files == sorted([f"{i}.mp4" for i in ids] + [f"{i}.png" for i in ids])
        wait_for(lambda: any(w["worker_id"] == "w-fault" for w in store.workers()), 30, "the worker's row")
        assert worker._thread.is_alive()
        worker.check_health()
        # each failing call site (claim, publish, heartbeat, progress) wrote one line at most, not one a try
        by_site = Counter(r.msg for r in warnings.records)
        assert max(by_site.values(), default=0) <= 1, by_site
        print(f"\n[faults] redis outage {outage_s} s (lease {lease_s:g} s): first progress/complete "
              f"{recovery_s:.2f} s after the restart, all {len(ids)} jobs done {done_s:.2f} s after it "
              f"({time.monotonic() - killed:.1f} s after the kill)")
    finally:
        logging.getLogger("mochi_lab.worker").removeHandler(warnings)
        worker.stop(timeout=60)
        store.close()
        server.kill()


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.usefixtures("fault_injection")
def test_worker_idle_through_an_outage_serves_the_next_job(tmp_path, tiny_checkpoint, tiny):
    """Down while idle: the claim loop backs off (bounded) and picks up the next job once Redis is back."""
    need_tool("redis-server")
    server = RedisServer(tmp_path / "redis").start()
    url = f"{server.url}?prefix=faults-{uuid.uuid4().hex[:8]}"
    settings = _settings(tmp_path, url, tiny_checkpoint)
    store = open_store(url)
    worker = Worker("w-idle", settings)
    worker.start()
    try:
        wait_for(lambda: worker.state == "idle", 120, "the worker to load")
        server.kill()
        time.sleep(3)  # the outage's length
        server.start()
        up = time.monotonic()
        job = wait_for(lambda: _try_enqueue(store, GenerationParams.parse("after", seed=1, **tiny).to_dict()), 10,
                       "an enqueue")
        wait_for(lambda: store.get("alice", job.id).status != "queued", 30, "the claim")
        claim_s = time.monotonic() - up
        wait_for(lambda: store.get("alice", job.id).status == DONE, 60, "the job done")
        assert claim_s < 5, claim_s  # backoff is capped at a few seconds
        print(f"\n[faults] idle worker claimed a job {claim_s:.2f} s after Redis came back")
        assert worker._thread.is_alive()
    finally:
        worker.stop(timeout=60)
        store.close()
        server.kill()


def _try_enqueue(store, params):
    try:
        return store.enqueue("alice", params)
    except StoreError:
        return None


def test_health_check_sees_a_dead_and_a_wedged_loop(tmp_path, tiny_checkpoint, tiny, monkeypatch):
    settings = _settings(tmp_path, None, tiny_checkpoint, worker_stall_s=1.0)
    stuck = threading.Event()
    hung_steps(monkeypatch, stuck.is_set)
    store = open_store(settings.store_url)
    worker = Worker("w-wedge", settings)
    worker.start()
    try:
        wait_for(lambda: worker.state == "idle", 120, "the worker to load")
        worker.check_health()
        stuck.set()  # the next job's first step never returns
        job = store.enqueue("alice", GenerationParams.parse("stuck", seed=1, **tiny).to_dict())
        wait_for(lambda: store.get("alice", job.id).status == "running", 30, "the claim")
        with pytest.raises(WorkerUnhealthy, match="no progress"):
            wait_for(lambda: worker.check_health() and False, 10, "the health check to fail")
    finally:
        stuck.clear()
        worker.stop(timeout=30)
    # a loop thread that died is unhealthy too
    dead = Worker("w-dead", settings)
    dead._thread = threading.Thread(target=lambda: None)
    dead._thread.start()
    dead._thread.join()
    with pytest.raises(WorkerUnhealthy, match="loop thread is dead"):
        dead.check_health()


def test_max_run_time_fails_the_job_without_a_retry(tmp_path, tiny_checkpoint, tiny, hold):
    settings = _settings(tmp_path, None, tiny_checkpoint, max_run_s=0.5)
    gate = hold("slow, held past its max run time", step=1)
    store = open_store(settings.store_url)
    job = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=1,
                                                        **{**tiny, "num_inference_steps": 50}).to_dict())
    worker = Worker("w-maxrun", settings)
    worker.start()
    try:
        # held at step 1 past its max run time, however fast the machine; on a loaded one its first step
        # alone may run past it, and the job ends before the gate
        wait_for(lambda: gate.reached() or store.get("alice", job.id).finished, 120, "the job at its gate")
        if gate.reached():
            time.sleep(settings.max_run_s)  # the setting's length, not a wait on the machine
        gate.release()
        wait_for(lambda: store.get("alice", job.id).finished, 60, "the slow job to end")
        got = store.get("alice", job.id)
        assert (got.status, got.error, got.attempts) == ("failed", "exceeded max run time (0.5 s)", 1)
        assert got.step < 50
        worker.settings = worker.settings.model_copy(update={"max_run_s": 3600.0})
        after = store.enqueue("alice", GenerationParams.parse("quick", seed=1, **tiny).to_dict())
        wait_for(lambda: store.get("alice", after.id).status == DONE, 60, "the next job")  # the worker serves on
    finally:
        worker.stop(timeout=30)


def test_a_cancel_ignored_past_its_grace_cancels_the_job_and_asks_for_a_restart(tmp_path, tiny_checkpoint, tiny,
                                                                                   monkeypatch, hold):
    """A step that never returns ignores the cancel: after cancel_grace_s the health check marks the job
    cancelled (not retried) and raises, which makes the pool actor exit and Ray restart it."""
    settings = _settings(tmp_path, None, tiny_checkpoint, cancel_grace_s=1.0, lease_s=1.5)
    stuck, hung = threading.Event(), threading.Event()

    def hangs() -> bool:
        if stuck.is_set():
            hung.set()
        return stuck.is_set()

    hung_steps(monkeypatch, hangs)
    gate = hold("stuck after its second step", step=2)
    store = open_store(settings.store_url)
    job = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=1,
                                                        **{**tiny, "num_inference_steps": 50}).to_dict())
    worker = Worker("w-grace", settings)
    worker.start()
    try:
        gate.wait_reached()
        stuck.set()  # step 3 will never return
        gate.release()
        hung.wait(60)
        assert hung.is_set(), "the job did not reach its hung step"
        store.cancel("alice", job.id)
        asked = time.monotonic()

        def unhealthy():
            try:
                worker.check_health()
            except WorkerUnhealthy as exc:
                return exc

        exc = wait_for(unhealthy, 10, "the health check to give up on the cancel", every=0.1)
        took = time.monotonic() - asked
        assert "ignored a cancel" in str(exc)
        got = store.get("alice", job.id)
        assert (got.status, got.attempts) == ("cancelled", 1)
        assert store.claim("other", 30) is None  # not retried
        assert took < 1.0 + 1.5 / 3 + 1.0, took  # grace + one heartbeat period + polling
        print(f"\n[faults] a cancel ignored by a stuck step: job cancelled and restart asked {took:.2f} s "
              f"after the request (grace 1 s)")
    finally:
        stuck.clear()
        worker.stop(timeout=30)


def test_a_restarted_worker_takes_back_its_previous_lifes_claims_at_once(tmp_path, tiny_checkpoint, tiny):
    """A worker that starts under the id of a dead one (a restarted actor) releases that one's claims:
    the job runs again now, although its lease (600 s) has not lapsed."""
    settings = _settings(tmp_path, None, tiny_checkpoint)
    store = open_store(settings.store_url)
    job = store.enqueue("alice", GenerationParams.parse("orphan", seed=1, **tiny).to_dict())
    old = store.claim("w-restart", 600)  # its previous life, SIGKILLed mid-job
    store.progress(job.id, old.token, stage="denoising", step=1, total=2)
    started = time.monotonic()
    worker = Worker("w-restart", settings)
    worker.start()
    try:
        wait_for(lambda: store.get("alice", job.id).status == DONE, 120, "the orphaned job done")
        got = store.get("alice", job.id)
        assert (got.attempts, got.fence, got.worker_id) == (2, old.token + 1, "w-restart")
        assert time.monotonic() - started < 60  # far inside the lease
    finally:
        worker.stop(timeout=30)
