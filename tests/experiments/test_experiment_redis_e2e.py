"""A small sweep end to end on Redis: a real Worker (tiny model) serving from a Redis store, no Ray.

The worker runs in a thread of the test process (the session's thread pool serves SQLite); the worker loop
is the same code a pool actor runs.
"""

import os
import uuid

import numpy as np
import pytest

from mochi_lab import Experiment
from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import Settings
from mochi_lab.store import open_store
from mochi_lab.video import read_frames
from mochi_lab.worker.loop import Worker


@pytest.fixture
def redis_worker(redis_url, tmp_path, tiny_checkpoint):
    url = f"{redis_url}?prefix=mochi-exp-e2e-{uuid.uuid4().hex[:12]}"
    settings = Settings(redis_url=url, data_dir=tmp_path / "data", cache_dir=os.environ["MOCHI_LAB_CACHE_DIR"],
                        lease_s=10.0, worker_ttl_s=10.0)
    worker = Worker("redis-e2e-worker", settings, "tiny")
    worker.start()
    store = open_store(url)
    yield DirectBackend(settings.model_copy(update={"account": "carol"}), store)
    worker.stop(timeout=60)
    store.drop_all()  # type: ignore[attr-defined]
    store.close()


def test_sweep_runs_end_to_end_on_redis(redis_worker, tiny):
    carol = redis_worker
    store = carol.store
    exp = Experiment.open(carol, "redis-sweep", tags=["redis"])
    jobs = exp.sweep(["a lantern", "a glacier"], [4], **tiny)
    assert exp.wait(timeout=300, progress=False)["done"] == 2
    # another handle (as another kernel would) sees the same runs, jobs and results
    again = Experiment.open(DirectBackend(carol.settings, open_store(store.url)), "redis-sweep")
    assert [r.job_id for r in again.runs] == [j.id for j in jobs]
    df = again.to_dataframe(all_columns=True)
    assert list(df["status"]) == ["done", "done"] and (df["denoise_s"] > 0).all()
    frames = [read_frames(p) for p in df["video"]]
    assert frames[0].shape == (7, 32, 32, 3) and not np.array_equal(frames[0], frames[1])
    meta = store.get("carol", jobs[0].id).meta
    assert meta["seed"] == 4 and meta["model_revision"].startswith("sha256:")
    assert exp.sweep(["a lantern", "a glacier"], [4], **tiny)[1].id == jobs[1].id
    assert Experiment.open(carol, "redis-sweep").resume() == []
