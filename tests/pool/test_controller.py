"""The pool controller on the session's Ray: sizing, and scale-down that never touches a busy worker.

Its pool is its own (namespace "mochi_ctl", a SQLite store of its own, workers asking for no CPU or GPU),
so the session's 4-worker pool is untouched. A job that must be running while the controller acts is held
at a gate. The autoscaling sequence on Ray's real autoscaler is tests/pool/test_autoscaling.py.
"""

from __future__ import annotations

import time

import pytest

from mochi_lab.config import ScalingConfig, Settings
from mochi_lab.params import GenerationParams
from mochi_lab.pool.controller import PoolController, desired_workers
from mochi_lab.store import open_store
from tests.support.jobkit import TINY

NAME = "mochi-worker-0"
HELD = "a long river, held at step 1"


@pytest.mark.parametrize("work, bounds, want", [
    (0, (0, 3), 0), (6, (0, 3), 3), (1, (0, 3), 1), (0, (1, 3), 1), (5, (0, 8), 3), (7, (0, 8), 4),
])
def test_desired_is_the_clamped_ceiling_of_work_per_target(work, bounds, want):
    config = ScalingConfig(min_workers=bounds[0], max_workers=bounds[1], target_per_worker=2 if bounds[1] == 8 else 1)
    assert desired_workers(work, config) == want


def test_bad_scaling_settings_name_the_field():
    with pytest.raises(ValueError, match="max_workers .1. must be at least min_workers .2."):
        ScalingConfig(min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match="target_per_worker"):
        ScalingConfig(target_per_worker=0)


@pytest.fixture()
def own_pool(ray_cluster, tmp_path):
    from mochi_lab.pool.driver import Pool

    settings = Settings.from_env(ray_address=ray_cluster.address, namespace="mochi_ctl", data_dir=tmp_path / "data",
                                 lease_s=4.0, worker_ttl_s=6.0, gpu_workers=False, cpus_per_worker=0)
    store = open_store(settings.store_url)
    pool = Pool(settings, store, "tiny")
    yield store, pool
    pool.shutdown()
    store.close()


def _until(what, test, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _held_job(store, seed):
    """A job that stays at denoising step 1 until the test's gate (on HELD) is released."""
    return store.enqueue("alice", GenerationParams.parse(HELD, seed=seed, **TINY).to_dict())


def _actor_state(handle) -> str:
    """The actor's state in Ray's actor table (which keeps the dead); a restart keeps the actor's id."""
    import ray

    return ray._private.state.actors(actor_id=handle._actor_id.hex())["State"]


def test_scale_down_due_while_a_job_runs_never_retires_the_busy_worker(own_pool, hold):
    store, pool = own_pool
    ctl = PoolController(pool, store, ScalingConfig(min_workers=0, max_workers=1, idle_timeout_s=0, cooldown_s=0))
    gate = hold(HELD)
    job = _held_job(store, 1)
    assert ctl.tick()["started"] == [NAME]
    pool.wait_ready()  # a cold actor: its process, its imports, its model (the pool's own start budget)
    gate.wait_reached()
    ctl.set_bounds(0, 0)  # an admin's scale to 0: with no idle timeout and no cool-down, due at once
    for _ in range(5):
        snap = ctl.tick()
        assert snap["leader"] and snap["desired"] == 0, snap
        assert not snap["retired"] and not ctl.retiring and NAME in pool.handles(), (snap, ctl.retiring)
        assert store.get("alice", job.id).status == "running"
    gate.release()
    _until("the job done", lambda: store.get("alice", job.id).status != "running")
    record = store.get("alice", job.id)
    assert (record.status, record.attempts) == ("done", 1)
    # idle now: retired at the next tick (once its row says idle), then gone with its row
    _until("retired", lambda: ctl.tick()["retired"] == [NAME], timeout=30)
    _until("actor gone", lambda: NAME not in pool.handles() and not store.workers(), timeout=60)
    assert store.get("alice", job.id).attempts == 1


def test_a_worker_retired_mid_job_finishes_it_then_exits(own_pool, hold):
    store, pool = own_pool
    pool.ensure(1)
    gate = hold(HELD)
    job = _held_job(store, 2)
    pool.wait_ready()  # a cold actor: its process, its imports, its model (the pool's own start budget)
    gate.wait_reached()
    handle = pool.handles()[NAME]
    assert set(pool.retire([NAME])) == {NAME}
    assert store.get("alice", job.id).status == "running" and NAME in pool.handles()  # retiring, not gone
    gate.release()
    _until("the job done", lambda: store.get("alice", job.id).status != "running")
    record = store.get("alice", job.id)
    assert (record.status, record.attempts, record.worker_id) == ("done", 1, NAME)
    _until("actor gone", lambda: NAME not in pool.handles(), timeout=60)
    # not restarted by Ray: a retired actor exits for good (DEAD is final; one to be restarted is RESTARTING)
    assert _actor_state(handle) == "DEAD"


def test_one_controller_leads_and_an_admins_scale_takes_the_lead(own_pool):
    store, pool = own_pool
    config = ScalingConfig(min_workers=0, max_workers=0)
    a, b = PoolController(pool, store, config, holder="a"), PoolController(pool, store, config, holder="b")
    assert a.tick()["leader"] and not b.tick()["leader"]
    b.set_bounds(0, 0)
    assert b.tick()["leader"] and not a.tick()["leader"]
