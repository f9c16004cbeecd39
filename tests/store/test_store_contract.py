"""The store contract, run against both backends (see conftest: `store` is SQLite, then Redis)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest

from mochi_lab.model import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STATUSES, JobNotFound, LeaseLost
from mochi_lab.store import Store, open_store


def drain(store: Store, worker: str = "w") -> list[str]:
    ids = []
    while (claim := store.claim(worker, lease_s=60)) is not None:
        ids.append(claim.job.id)
    return ids


# -- enqueue and idempotency --------------------------------------------------------------
def test_enqueue_round_trips_every_field(store: Store) -> None:
    params = {"prompt": "Ein Fuchs im Schnee ❄", "num_frames": 19, "nested": {"a": [1, 2.5, None, True]}}
    before = time.time()
    job = store.enqueue("alice", params, priority=3, experiment="exp1", tags=["a", "b"])
    got = store.get("alice", job.id)
    assert got == job
    assert (got.account, got.params, got.priority, got.experiment, got.tags) == ("alice", params, 3, "exp1", ["a", "b"])
    assert (got.status, got.stage, got.attempts, got.fence, got.cancel_requested) == (QUEUED, QUEUED, 0, 0, False)
    assert before - 1 < got.created_at < time.time() + 1
    assert got.started_at is None and got.finished_at is None and got.worker_id is None


def test_idempotency_key_returns_the_first_job(store: Store) -> None:
    first = store.enqueue("alice", {"prompt": "one"}, idempotency_key="k1")
    again = store.enqueue("alice", {"prompt": "two"}, idempotency_key="k1")
    assert again.id == first.id and again.params == {"prompt": "one"}
    other_key = store.enqueue("alice", {"prompt": "one"}, idempotency_key="k2")
    other_account = store.enqueue("bob", {"prompt": "one"}, idempotency_key="k1")
    no_key = [store.enqueue("alice", {"prompt": "x"}).id for _ in range(2)]
    assert len({first.id, other_key.id, other_account.id, *no_key}) == 5
    assert store.counts("alice")[QUEUED] == 4
    # a claimed job keeps answering its key
    assert store.claim("w", 60).job.id == first.id
    assert store.enqueue("alice", {"prompt": "one"}, idempotency_key="k1").status == RUNNING


# -- claim ---------------------------------------------------------------------------------
def test_claim_takes_a_lease_and_fences(store: Store) -> None:
    assert store.claim("w1", 30) is None
    job = store.enqueue("alice", {"prompt": "p"})
    now = time.time()
    claim = store.claim("w1", 30)
    assert claim is not None and claim.job.id == job.id
    got = store.get("alice", job.id)
    assert got == claim.job
    assert (got.status, got.stage, got.worker_id, got.attempts, got.fence) == (RUNNING, "claimed", "w1", 1, 1)
    assert claim.token == 1
    assert now + 28 < got.lease_expires_at < now + 32
    assert now - 1 < got.started_at < now + 1
    assert store.claim("w2", 30) is None  # taken once only


def test_priority_then_fifo_inside_an_account(store: Store) -> None:
    ids = {name: store.enqueue("alice", {"prompt": name}, priority=p).id
           for name, p in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]}
    order = drain(store)
    assert order == [ids[n] for n in "bdace"]


def test_fair_across_accounts(store: Store) -> None:
    for i in range(100):
        store.enqueue("A", {"prompt": f"a{i}"})
    b = store.enqueue("B", {"prompt": "b"})
    first_two = [store.claim("w", 60).job.id for _ in range(2)]
    assert b.id in first_two


def test_round_robin_between_busy_accounts(store: Store) -> None:
    for account in "XYZ":
        for i in range(3):
            store.enqueue(account, {"prompt": f"{account}{i}"})
    accounts = [store.claim("w", 60).job.account for _ in range(9)]
    for i in range(0, 9, 3):
        assert sorted(accounts[i : i + 3]) == ["X", "Y", "Z"], accounts
    # an account's priority does not let it starve the others
    for i in range(5):
        store.enqueue("X", {"prompt": f"urgent{i}"}, priority=10)
    store.enqueue("Y", {"prompt": "plain"})
    assert {store.claim("w", 60).job.account for _ in range(2)} == {"X", "Y"}


def test_queued_lists_every_account_in_the_order_workers_will_take_them(store: Store) -> None:
    assert store.queued() == []
    for account, n in [("carol", 1), ("alice", 4), ("bob", 2)]:
        for i in range(n):
            store.enqueue(account, {"prompt": f"{account}{i}"}, priority=5 if (account, i) == ("alice", 3) else 0)
    store.claim("w", 60)  # alice (first by name among the never-served) is served and goes to the back
    gone = store.enqueue("bob", {"prompt": "cancelled"})
    store.cancel("bob", gone.id)
    store.enqueue("dave", {"prompt": "dave0"}, priority=-3)

    predicted = store.queued()
    assert [j.params["prompt"] for j in predicted[:3]] == ["bob0", "carol0", "dave0"]
    assert all(j.status == QUEUED for j in predicted)
    assert store.queued(limit=4) == predicted[:4]
    assert [j.id for j in predicted] == drain(store)  # the prediction is the claim order, job for job
    assert store.queued() == []


# -- owner writes ----------------------------------------------------------------------------
def test_heartbeat_and_progress(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w1", 5)
    assert store.heartbeat(job.id, claim.token, 100) is False
    assert store.get("alice", job.id).lease_expires_at > time.time() + 90
    message = 'step 3/8 "ok" \\ ✓ 步骤'
    assert store.progress(job.id, claim.token, stage="denoising", step=3, total=8, message=message) is False
    got = store.get("alice", job.id)
    assert (got.stage, got.step, got.total_steps, got.message) == ("denoising", 3, 8, message)
    store.progress(job.id, claim.token, stage="decoding")  # step/total left as they were
    got = store.get("alice", job.id)
    assert (got.stage, got.step, got.total_steps, got.status) == ("decoding", 3, 8, RUNNING)


def test_the_progress_log_keeps_every_write_in_order_per_account(store: Store, monkeypatch) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    assert store.progress_since("alice", job.id) == []
    claim = store.claim("w1", 60)
    store.progress(job.id, claim.token, stage="loading", message="<b>ü</b>")
    for k in range(4):
        store.progress(job.id, claim.token, stage="denoising", step=k, total=3)
    store.progress(job.id, claim.token, stage="decoding")  # step/total as they were
    log = store.progress_since("alice", job.id)
    assert [(e["seq"], e["status"], e["stage"], e["step"], e["total_steps"]) for e in log] == [
        (0, RUNNING, "loading", 0, 0), (1, RUNNING, "denoising", 0, 3), (2, RUNNING, "denoising", 1, 3),
        (3, RUNNING, "denoising", 2, 3), (4, RUNNING, "denoising", 3, 3), (5, RUNNING, "decoding", 3, 3)]
    assert log[0]["message"] == "<b>ü</b>" and {e["attempts"] for e in log} == {1}
    assert [e["seq"] for e in store.progress_since("alice", job.id, after_seq=3)] == [4, 5]
    assert store.progress_since("alice", job.id, after_seq=99) == []
    with pytest.raises(JobNotFound):  # another account's id reads as a missing one
        store.progress_since("bob", job.id)
    # a write that lost its lease logs nothing
    store.release_worker("w1")
    with pytest.raises(LeaseLost):
        store.progress(job.id, claim.token, stage="denoising", step=9)
    again = store.claim("w2", 60)
    store.progress(job.id, again.token, stage="loading")
    assert [(e["seq"], e["attempts"]) for e in store.progress_since("alice", job.id, 5)] == [(6, 2)]
    store.complete(job.id, again.token, artifacts={}, timings={}, meta={})
    assert len(store.progress_since("alice", job.id)) == 7  # kept a while for late readers
    store.delete("alice", job.id)
    with pytest.raises(JobNotFound):
        store.progress_since("alice", job.id)


def test_live_figures_ride_with_progress_and_a_claim_clears_them(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    assert store.get("alice", job.id).live == {}
    claim = store.claim("w1", 60)
    store.progress(job.id, claim.token, stage="denoising", step=1, total=4, live={"eta_s": 3.5, "rate": 2.0})
    store.progress(job.id, claim.token, stage="denoising", step=2)  # live left as it was
    assert store.get("alice", job.id).live == {"eta_s": 3.5, "rate": 2.0}
    log = store.progress_since("alice", job.id)
    assert log[0]["live"] == {"eta_s": 3.5, "rate": 2.0} and log[1]["live"] == {"eta_s": 3.5, "rate": 2.0}
    store.release_worker("w1")
    store.claim("w2", 60)
    assert store.get("alice", job.id).live == {}  # a new attempt starts without the old figures


def test_previews_are_owned_bounded_overwritten_and_dropped_with_the_video(store: Store) -> None:
    from mochi_lab.store.base import PREVIEW_MAX_BYTES

    a, b = store.enqueue("alice", {"prompt": "a"}), store.enqueue("alice", {"prompt": "b"})
    assert store.get_preview("alice", a.id) is None
    ca, cb = store.claim("w", 60), store.claim("w", 60)
    store.put_preview(a.id, ca.token, 3, b"RIFF\x00one")
    store.put_preview(a.id, ca.token, 6, b"RIFF\x00two")  # overwritten: one preview per job
    assert store.get_preview("alice", a.id) == (6, b"RIFF\x00two")
    with pytest.raises(JobNotFound):
        store.get_preview("bob", a.id)
    with pytest.raises(ValueError, match="at most"):
        store.put_preview(a.id, ca.token, 7, b"x" * (PREVIEW_MAX_BYTES + 1))
    with pytest.raises(LeaseLost):  # only the job's owner writes it
        store.put_preview(a.id, ca.token + 1, 7, b"forged")
    store.put_preview(b.id, cb.token, 2, bytes(range(256)))  # any bytes survive the trip
    store.cancel("alice", b.id)
    store.finish_cancelled(b.id, cb.token)
    assert store.get_preview("alice", b.id) == (2, bytes(range(256)))  # a cancelled job keeps its last look
    store.complete(a.id, ca.token, artifacts={}, timings={}, meta={})
    assert store.get_preview("alice", a.id) is None  # the video replaces it
    store.delete("alice", b.id)
    with pytest.raises(JobNotFound):
        store.get_preview("alice", b.id)
    if hasattr(store, "prefix"):  # and nothing of it is left behind
        assert store._client.exists(f"{store.prefix}:preview:{b.id}", f"{store.prefix}:preview:{a.id}") == 0
    else:
        assert store._conn().execute("SELECT COUNT(*) FROM previews").fetchone()[0] == 0


def test_the_progress_log_is_capped(store: Store, monkeypatch) -> None:
    import mochi_lab.store.redis as redis_store
    import mochi_lab.store.sqlite as sqlite_store

    for module in (redis_store, sqlite_store):
        monkeypatch.setattr(module, "PROGRESS_LOG_MAX", 5)
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w1", 60)
    for k in range(9):
        store.progress(job.id, claim.token, stage="denoising", step=k, total=8)
    assert [e["step"] for e in store.progress_since("alice", job.id)] == [0, 1, 2, 3, 4]
    assert store.get("alice", job.id).step == 8  # the job itself keeps moving


def test_complete_fail_and_finish_cancelled(store: Store) -> None:
    a, b, c = (store.enqueue("alice", {"prompt": n}) for n in "abc")
    ca, cb, cc = (store.claim("w", 60) for _ in range(3))
    store.complete(a.id, ca.token, artifacts={"video": "/v/a.mp4"}, timings={"denoise_s": 1.5}, meta={"gpu": "H100"})
    got = store.get("alice", a.id)
    assert (got.status, got.stage, got.artifacts, got.timings, got.meta) == (
        DONE, DONE, {"video": "/v/a.mp4"}, {"denoise_s": 1.5}, {"gpu": "H100"})
    assert got.finished_at >= got.started_at and got.lease_expires_at is None
    store.fail(b.id, cb.token, error="OOM", traceback="Traceback ...", timings={"load_s": 2.0})
    got = store.get("alice", b.id)
    assert (got.status, got.stage, got.error, got.traceback) == (FAILED, FAILED, "OOM", "Traceback ...")
    assert got.timings == {"load_s": 2.0}
    store.finish_cancelled(c.id, cc.token, meta={"at_step": 2})
    got = store.get("alice", c.id)
    assert (got.status, got.stage, got.meta) == (CANCELLED, CANCELLED, {"at_step": 2})
    assert got.finished_at is not None
    # a finished job takes no more owner writes
    for job, claim in [(a, ca), (b, cb), (c, cc)]:
        before = store.get("alice", job.id)
        with pytest.raises(LeaseLost):
            store.complete(job.id, claim.token, artifacts={"video": "late"}, timings={}, meta={})
        with pytest.raises(LeaseLost):
            store.heartbeat(job.id, claim.token, 60)
        assert store.get("alice", job.id) == before


def test_wrong_token_is_rejected(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w", 60)
    before = store.get("alice", job.id)
    for bad in (claim.token + 1, claim.token - 1):
        with pytest.raises(LeaseLost):
            store.progress(job.id, bad, stage="denoising", step=1, total=2)
        with pytest.raises(LeaseLost):
            store.fail(job.id, bad, error="nope")
    assert store.get("alice", job.id) == before
    with pytest.raises(LeaseLost):
        store.heartbeat("no-such-job", 1, 60)


def test_stale_owner_is_locked_out(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    old = store.claim("w1", 0.2)
    time.sleep(0.3)
    new = store.claim("w2", 60)  # the claim requeues the expired lease first, then takes it
    assert new is not None and new.job.id == job.id
    assert new.token > old.token
    assert (new.job.worker_id, new.job.attempts) == ("w2", 2)
    with pytest.raises(LeaseLost):
        store.progress(job.id, old.token, stage="denoising", step=9, total=9)
    with pytest.raises(LeaseLost):
        store.heartbeat(job.id, old.token, 60)
    store.complete(job.id, new.token, artifacts={"video": "/new.mp4"}, timings={"total_s": 1.0}, meta={"w": 2})
    with pytest.raises(LeaseLost):
        store.complete(job.id, old.token, artifacts={"video": "/old.mp4"}, timings={}, meta={"w": 1})
    with pytest.raises(LeaseLost):
        store.fail(job.id, old.token, error="late")
    got = store.get("alice", job.id)
    assert (got.status, got.artifacts, got.meta) == (DONE, {"video": "/new.mp4"}, {"w": 2})
    assert (got.worker_id, got.error, got.fence) == ("w2", None, new.token)


def test_requeue_expired_keeps_attempts(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    first = store.claim("w1", 30)
    assert store.requeue_expired() == []  # not expired yet
    assert store.requeue_expired(now=time.time() + 60) == [job.id]
    got = store.get("alice", job.id)
    assert (got.status, got.stage, got.attempts, got.worker_id, got.lease_expires_at) == (QUEUED, QUEUED, 1, None, None)
    with pytest.raises(LeaseLost):  # a requeued job has no owner
        store.heartbeat(job.id, first.token, 30)
    second = store.claim("w2", 30)
    assert (second.job.id, second.job.attempts, second.token) == (job.id, 2, first.token + 1)
    assert second.job.started_at == first.job.started_at  # first start is kept


def test_attempts_are_bounded(make_store) -> None:
    store = make_store(max_attempts=2)
    job = store.enqueue("alice", {"prompt": "p"})
    other = store.enqueue("alice", {"prompt": "q"})
    assert store.claim("w1", 0.1).job.id == job.id
    time.sleep(0.15)
    second = store.claim("w2", 0.1)  # job requeued before the pick; its retry goes first (older)
    assert (second.job.id, second.job.attempts) == (job.id, 2)
    time.sleep(0.15)
    third = store.claim("w3", 60)
    assert third.job.id == other.id  # the worn-out job is not handed out again
    got = store.get("alice", job.id)
    assert (got.status, got.stage, got.error, got.attempts) == (FAILED, FAILED, "worker lost 2 times", 2)
    assert got.finished_at is not None
    assert store.claim("w4", 60) is None


def test_expired_lease_of_a_cancel_requested_job_cancels_it(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    store.claim("w1", 30)
    store.cancel("alice", job.id)
    assert store.requeue_expired(now=time.time() + 60) == [job.id]
    assert store.get("alice", job.id).status == CANCELLED
    assert store.claim("w2", 30) is None


# -- cancel ------------------------------------------------------------------------------------
def test_cancel_queued_is_immediate(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    got = store.cancel("alice", job.id)
    assert (got.status, got.stage) == (CANCELLED, CANCELLED) and got.finished_at is not None
    assert store.get("alice", job.id) == got
    assert store.claim("w", 60) is None  # never started
    assert store.counts("alice")[CANCELLED] == 1 and store.counts("alice")[QUEUED] == 0


def test_cancel_running_sets_the_flag(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w", 60)
    got = store.cancel("alice", job.id)
    assert (got.status, got.cancel_requested) == (RUNNING, True)
    assert store.heartbeat(job.id, claim.token, 60) is True
    assert store.progress(job.id, claim.token, stage="denoising", step=2, total=4) is True
    store.finish_cancelled(job.id, claim.token)
    assert store.get("alice", job.id).status == CANCELLED


def test_cancel_finished_changes_nothing(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w", 60)
    store.complete(job.id, claim.token, artifacts={"video": "/v.mp4"}, timings={}, meta={})
    before = store.get("alice", job.id)
    assert store.cancel("alice", job.id) == before
    assert store.get("alice", job.id) == before


# -- isolation ---------------------------------------------------------------------------------
def test_accounts_are_isolated(store: Store, tmp_path: Path) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"mp4")
    job = store.enqueue("alice", {"prompt": "secret"}, experiment="e", tags=["t"])
    claim = store.claim("w", 60)
    store.complete(job.id, claim.token, artifacts={"video": str(video)}, timings={}, meta={})
    for op in (store.get, store.cancel, store.delete):
        with pytest.raises(JobNotFound, match=job.id):
            op("bob", job.id)
    assert store.list("bob") == [] and store.list("bob", text="secret") == []
    assert store.counts("bob") == dict.fromkeys(STATUSES, 0)
    assert store.get("alice", job.id).status == DONE and video.exists()
    with pytest.raises(JobNotFound, match="nope-123"):
        store.get("alice", "nope-123")
    with pytest.raises(KeyError):  # JobNotFound is a KeyError too
        store.get("alice", "nope-123")


# -- history -------------------------------------------------------------------------------------
def test_list_newest_first_with_pagination(store: Store) -> None:
    ids = [store.enqueue("alice", {"prompt": f"p{i}"}).id for i in range(7)]
    store.enqueue("bob", {"prompt": "other"})
    newest_first = ids[::-1]
    assert [j.id for j in store.list("alice")] == newest_first
    pages = [[j.id for j in store.list("alice", limit=3, offset=o)] for o in (0, 3, 6, 9)]
    assert pages == [newest_first[:3], newest_first[3:6], newest_first[6:], []]
    assert store.list("alice", limit=0) == []


def test_list_filters(store: Store) -> None:
    a = store.enqueue("alice", {"prompt": "A red Fox jumps"}, experiment="e1", tags=["fox", "red"])
    b = store.enqueue("alice", {"prompt": "a blue whale"}, experiment="e1", tags=["blue"])
    c = store.enqueue("alice", {"prompt": "FOXES in snow"}, experiment="e2", tags=["fox"])
    d = store.enqueue("alice", {"negative_prompt": "fox"})  # no prompt: never a text match
    claim = store.claim("w", 60)
    store.complete(claim.job.id, claim.token, artifacts={}, timings={}, meta={})  # a is done

    def ids(**kw) -> list[str]:
        return [j.id for j in store.list("alice", **kw)]

    assert ids(status=DONE) == [a.id]
    assert ids(status=QUEUED) == [d.id, c.id, b.id]
    assert ids(experiment="e1") == [b.id, a.id]
    assert ids(tag="fox") == [c.id, a.id]
    assert ids(text="fox") == [c.id, a.id]  # case-insensitive substring of the prompt
    assert ids(text="fox", status=QUEUED) == [c.id]
    assert ids(tag="fox", experiment="e1") == [a.id]
    assert ids(experiment="e1", status=QUEUED) == [b.id] and ids(experiment="e1", status=DONE) == [a.id]
    assert ids(experiment="e1", limit=1, offset=1) == [a.id] and ids(experiment="nope") == []
    assert ids(text="fox", limit=1, offset=1) == [a.id]
    assert ids(text="nothing") == [] and ids(tag="nope") == [] and ids(status=FAILED) == []
    with pytest.raises(ValueError, match="status"):
        store.list("alice", status="finished")


def test_filtered_pagination_walks_past_many_non_matches(store: Store) -> None:
    wanted = []
    for i in range(450):
        job = store.enqueue("alice", {"prompt": f"needle {i}" if i % 150 == 0 else f"hay {i}"})
        if i % 150 == 0:
            wanted.append(job.id)
    assert [j.id for j in store.list("alice", text="NEEDLE")] == wanted[::-1]
    assert [j.id for j in store.list("alice", text="needle", offset=2)] == [wanted[0]]


def test_counts_every_status(store: Store) -> None:
    assert store.counts("alice") == {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 0}
    jobs = [store.enqueue("alice", {"prompt": str(i)}) for i in range(6)]
    claims = [store.claim("w", 60) for _ in range(3)]
    store.complete(claims[0].job.id, claims[0].token, artifacts={}, timings={}, meta={})
    store.fail(claims[1].job.id, claims[1].token, error="x")
    store.cancel("alice", jobs[5].id)
    assert store.counts("alice") == {QUEUED: 2, RUNNING: 1, DONE: 1, FAILED: 1, CANCELLED: 1}


def test_delete_removes_record_files_and_queue_entry(store: Store, tmp_path: Path) -> None:
    video, poster = tmp_path / "v.mp4", tmp_path / "p.png"
    for f in (video, poster):
        f.write_bytes(b"x")
    done = store.enqueue("alice", {"prompt": "done"}, idempotency_key="key")
    claim = store.claim("w", 60)
    store.complete(done.id, claim.token, artifacts={"video": str(video), "poster": str(poster)}, timings={}, meta={})
    store.delete("alice", done.id)
    with pytest.raises(JobNotFound):
        store.get("alice", done.id)
    assert not video.exists() and not poster.exists()
    assert store.list("alice") == [] and store.counts("alice") == dict.fromkeys(STATUSES, 0)
    # the key is free again once its job is gone
    assert store.enqueue("alice", {"prompt": "again"}, idempotency_key="key").id != done.id
    queued = store.enqueue("alice", {"prompt": "queued"})
    store.delete("alice", queued.id)
    assert [c.job.params["prompt"] for c in iter(lambda: store.claim("w", 60), None)] == ["again"]
    with pytest.raises(JobNotFound):
        store.delete("alice", queued.id)


def test_delete_running_job_locks_its_worker_out(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    claim = store.claim("w", 60)
    store.delete("alice", job.id)
    with pytest.raises(LeaseLost):
        store.progress(job.id, claim.token, stage="denoising", step=1, total=2)
    with pytest.raises(LeaseLost):
        store.complete(job.id, claim.token, artifacts={}, timings={}, meta={})
    with pytest.raises(JobNotFound):
        store.get("alice", job.id)
    assert store.requeue_expired(now=time.time() + 120) == []  # no lease left behind
    assert store.claim("w2", 60) is None


# -- workers and experiments --------------------------------------------------------------------
def test_workers_registry_with_ttl(store: Store) -> None:
    # TTLs long enough that a stalled machine cannot expire a row between a write and the next read
    store.put_worker({"worker_id": "w-b", "gpu": "H100", "job_id": None}, ttl_s=60)
    store.put_worker({"worker_id": "w-a", "gpu": "H100", "memory_gb": 80.0}, ttl_s=60)
    rows = store.workers()
    assert [w["worker_id"] for w in rows] == ["w-a", "w-b"]
    assert rows[0] == {"worker_id": "w-a", "gpu": "H100", "memory_gb": 80.0}
    store.put_worker({"worker_id": "w-a", "gpu": "H100", "job_id": "j1"}, ttl_s=60)  # renew and update
    assert store.workers()[0]["job_id"] == "j1"
    store.put_worker({"worker_id": "w-a", "gpu": "H100", "job_id": "j1"}, ttl_s=0.2)  # not renewed: it goes
    deadline = time.monotonic() + 10
    while "w-a" in [w["worker_id"] for w in store.workers()]:
        assert time.monotonic() < deadline, "an expired worker row was still listed after 10 s"
        time.sleep(0.05)
    assert [w["worker_id"] for w in store.workers()] == ["w-b"]
    store.remove_worker("w-b")
    store.remove_worker("never-there")
    assert store.workers() == []


def test_experiments_per_account(store: Store) -> None:
    store.put_experiment("alice", {"name": "first", "note": "v1"})
    store.put_experiment("alice", {"name": "second", "grid": {"seed": [1, 2]}})
    store.put_experiment("alice", {"name": "first", "note": "v2"})  # update in place
    assert store.get_experiment("alice", "first") == {"name": "first", "note": "v2"}
    assert [e["name"] for e in store.list_experiments("alice")] == ["second", "first"]
    with pytest.raises(KeyError, match="first"):
        store.get_experiment("bob", "first")
    assert store.list_experiments("bob") == []


# -- construction ------------------------------------------------------------------------------------
def test_picklable_by_url(store: Store) -> None:
    job = store.enqueue("alice", {"prompt": "p"})
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is type(store) and clone.url == store.url
    assert clone.get("alice", job.id) == job
    other = open_store(store.url)
    assert other.claim("w", 60).job.id == job.id
    other.close()


# -- cancel racing completion (issue 12 #8) ------------------------------------------------------
def test_completion_clears_a_cancel_request_that_came_too_late(store: Store) -> None:
    done, failed, cancelled = (store.enqueue("alice", {"prompt": n}) for n in "abc")
    cd, cf, cc = (store.claim("w", 60) for _ in range(3))
    for job in (done, failed, cancelled):
        assert store.cancel("alice", job.id).cancel_requested  # requested while running
    store.complete(done.id, cd.token, artifacts={"video": "/v.mp4"}, timings={}, meta={})
    store.fail(failed.id, cf.token, error="OOM")
    store.finish_cancelled(cancelled.id, cc.token)
    got = store.get("alice", done.id)
    assert (got.status, got.cancel_requested) == (DONE, False)
    assert (store.get("alice", failed.id).status, store.get("alice", failed.id).cancel_requested) == (FAILED, False)
    assert store.get("alice", cancelled.id).status == CANCELLED
    # a cancel after the end answers the final state and changes nothing
    for job in (done, failed, cancelled):
        before = store.get("alice", job.id)
        after = store.cancel("alice", job.id)
        assert after == before == store.get("alice", job.id)
    assert store.cancel("alice", done.id).cancel_requested is False


# -- releasing a dead worker's claims (issue 12 #9) -----------------------------------------------
def test_release_worker_requeues_its_running_jobs_at_once(store: Store) -> None:
    a, b, c = (store.enqueue("alice", {"prompt": n}) for n in "abc")
    ca = store.claim("dead", 600)
    cb = store.claim("alive", 600)
    assert store.release_worker("nobody") == []
    assert store.release_worker("dead") == [a.id]
    got = store.get("alice", a.id)
    assert (got.status, got.stage, got.attempts, got.worker_id, got.lease_expires_at) == (QUEUED, QUEUED, 1, None, None)
    assert store.get("alice", b.id).status == RUNNING  # another worker's claim is untouched
    with pytest.raises(LeaseLost):  # the old owner is locked out before anyone claims again
        store.progress(a.id, ca.token, stage="denoising", step=1, total=2)
    again = store.claim("dead", 600)  # the restarted worker (same id) or any other takes it next
    assert (again.job.id, again.job.attempts, again.token) == (a.id, 2, ca.token + 1)
    with pytest.raises(LeaseLost):
        store.complete(a.id, ca.token, artifacts={}, timings={}, meta={})
    store.complete(a.id, again.token, artifacts={}, timings={}, meta={})
    store.complete(b.id, cb.token, artifacts={}, timings={}, meta={})
    assert store.release_worker("dead") == []  # finished jobs are not touched
    assert store.get("alice", a.id).status == DONE
    assert store.claim("w", 60).job.id == c.id


def test_release_worker_follows_the_expiry_rules(make_store) -> None:
    store = make_store(max_attempts=1)
    worn, cancelled = store.enqueue("alice", {"prompt": "worn"}), store.enqueue("alice", {"prompt": "cancelled"})
    store.claim("dead", 600), store.claim("dead", 600)
    store.cancel("alice", cancelled.id)
    assert sorted(store.release_worker("dead")) == sorted([worn.id, cancelled.id])
    got = store.get("alice", worn.id)
    assert (got.status, got.error) == (FAILED, "worker lost 1 times")
    assert store.get("alice", cancelled.id).status == CANCELLED
    assert store.claim("w", 60) is None
    assert store.counts("alice")[RUNNING] == 0


def test_a_store_file_from_before_live_figures_opens_and_gains_them(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    store = open_store(url)
    job = store.enqueue("alice", {"prompt": "p"})
    store.close()
    with sqlite3.connect(tmp_path / "old.sqlite3") as db:  # as the first release wrote it
        db.execute("ALTER TABLE jobs DROP COLUMN live")
    store = open_store(url)
    assert store.get("alice", job.id).live == {}
    claim = store.claim("w", 60)
    store.progress(job.id, claim.token, stage="denoising", step=1, total=2, live={"eta_s": 1.0})
    assert store.get("alice", job.id).live == {"eta_s": 1.0}
    store.close()


# -- the pool's controller ---------------------------------------------------------------
def test_queue_depth_counts_queued_and_running_by_account_model_and_status(store: Store) -> None:
    assert store.queue_depth() == {}
    for i in range(3):
        store.enqueue("alice", {"prompt": str(i), "model": "tiny"})
    store.enqueue("bob", {"prompt": "b", "model": "mochi-1-preview"})
    store.enqueue("bob", {"prompt": "no model"})
    carols = store.enqueue("carol", {"prompt": "c", "model": "tiny"})
    claim = store.claim("w", 60)  # fairness: the first account's oldest job
    store.complete(claim.job.id, claim.token, artifacts={}, timings={}, meta={})
    claim = store.claim("w", 60)
    assert claim.job.account == "bob"
    assert store.queue_depth() == {
        ("alice", "tiny", QUEUED): 2,
        ("bob", "?", QUEUED): 1,
        ("bob", "mochi-1-preview", RUNNING): 1,
        ("carol", "tiny", QUEUED): 1,
    }
    store.cancel("carol", carols.id)
    assert ("carol", "tiny", QUEUED) not in store.queue_depth()


def test_lead_has_one_holder_until_its_time_runs_out(store: Store) -> None:
    # long holds where the test needs them to last (a stalled machine cannot end one between two calls)
    assert store.lead("pool", "a", 60)
    assert store.lead("pool", "a", 60)  # renewed
    assert not store.lead("pool", "b", 60)
    assert store.lead("other-role", "b", 60)
    assert store.lead("pool", "a", 0.3)  # renewed for a short time: the holder's last word counts
    time.sleep(0.4)  # past it (a lower bound: no machine is too fast for it)
    assert store.lead("pool", "b", 10)
    assert not store.lead("pool", "a", 10)
    assert store.lead("pool", "a", 10, take=True)
    assert not store.lead("pool", "b", 10)


def test_sessions_expire_are_seen_by_every_opener_and_are_taken_once(make_store) -> None:
    """The gateway's web sessions: what one replica puts another reads; a take is once, even when raced."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = make_store(), make_store()
    a.put_session("session:k1", {"token": "t1"}, 30)
    assert b.get_session("session:k1") == {"token": "t1"}
    assert b.get_session("session:other") is None
    a.put_session("session:k1", {"token": "t2"}, 30)  # replaced
    assert b.get_session("session:k1") == {"token": "t2"}
    assert b.take_session("session:k1") == {"token": "t2"}
    assert a.get_session("session:k1") is None and a.take_session("session:k1") is None

    a.put_session("login:race", {"verifier": "v"}, 30)
    with ThreadPoolExecutor(8) as pool:
        takes = list(pool.map(lambda s: s.take_session("login:race"), [make_store() for _ in range(8)]))
    assert takes.count({"verifier": "v"}) == 1 and takes.count(None) == 7

    a.put_session("session:short", {"token": "t"}, 0.3)
    a.put_session("session:long", {"token": "t"}, 30)
    time.sleep(0.4)  # past the short one's time (a lower bound: no machine is too fast for it)
    assert b.get_session("session:short") is None and b.take_session("session:short") is None
    assert b.get_session("session:long") == {"token": "t"}
