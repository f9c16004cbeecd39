"""2-GPU workers (`gpus_per_worker=2`) on a real Ray with logical GPUs: a gang of two actors (gloo on CPU)
renders one guided video with the CFG batch split between them.

The gang has its own node (2 logical GPUs), namespace and SQLite store, so the session pool and it never
claim each other's jobs. A test that acts mid-denoise holds rank 0 at a gate (rank 1 waits for it in the
next collective).
"""

from __future__ import annotations

import os
import signal
import time

import av
import numpy as np
import pytest

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import load_runner
from mochi_lab.video import write_mp4
from tests.support.faults_helpers import remove_nodes, wait_for
from tests.support.jobkit import TINY

NAMESPACE = "mochi_gang_test"
# a guided job (both ranks work) with steps before and after the gates the tests hold it at
GUIDED = {**TINY, "num_inference_steps": 8, "guidance_scale": 4.5}
# The budget for a gang to form: two new processes that each load the model, the first time or after a
# loss. It is the same budget however it formed; how fast that is belongs to the benchmarks, not here.
FORM_S = 300


@pytest.fixture(scope="module")
def gang(ray_cluster, tmp_path_factory):
    from mochi_lab import MochiCluster
    from mochi_lab.config import Settings

    node = ray_cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=200 * 2**20)
    ray_cluster.wait_for_nodes()
    settings = Settings.from_env(ray_address=ray_cluster.address, namespace=NAMESPACE, gpus_per_worker=2,
                                 workers=1, lease_s=4.0, worker_ttl_s=6.0,
                                 data_dir=tmp_path_factory.mktemp("gang-data"))
    cluster = MochiCluster(settings=settings)
    cluster.wait_ready(timeout=FORM_S)
    try:
        yield cluster
    finally:
        import ray

        cluster.shutdown_pool()
        cluster.close()
        # the pool's shutdown takes the peer and the placement group (2 GPUs) with it
        table = {row["name"]: row for row in ray.util.placement_group_table().values()}
        assert table[f"mochi-gang-{NAMESPACE}-0"]["state"] == "REMOVED"
        with pytest.raises(ValueError):
            ray.get_actor("mochi-peer-0", namespace=NAMESPACE)
        remove_nodes(ray_cluster, [node])


def _formed(gang, *, replacing: int | None = None) -> dict:
    """Rank 0's row once the gang has formed: loaded (rank 0 loads only after it joined its peer), and with
    `replacing`, a rank 0 other than that process (a lost rank's row stays until its TTL)."""

    def ready():
        rows = gang.workers()
        return rows and rows[0]["state"] in ("idle", "busy") and rows[0]["pid"] != replacing and rows[0]

    return wait_for(ready, FORM_S, "the gang to form" + (f" again without pid {replacing}" if replacing else ""),
                    every=0.2)


@pytest.fixture
def formed(gang) -> dict:
    """The gang, formed: each test starts on a pair that has finished forming, whatever the test before
    it did to the last one."""
    return _formed(gang)


def _peer():
    import ray

    return ray.get_actor("mochi-peer-0", namespace=NAMESPACE)


def _decoded(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_guided_job_on_two_ranks_gives_the_single_process_video(gang, tiny, tiny_checkpoint, tmp_path):
    import ray

    params = {**tiny, "num_inference_steps": 4, "guidance_scale": 4.5}
    done = gang.generate("a cat surfing a wave", seed=11, **params).wait(timeout=300)
    assert done.status == "done", done.error
    last = ray.get(_peer().ping.remote())["last"]
    assert last["seed"] == 11 and last["outcome"] == "done" and last["stats"]["calls"] == 4  # rank 1 did half
    assert done.meta["gang"]["peer"] == "mochi-peer-0"
    table = {row["name"]: row for row in ray.util.placement_group_table().values()}
    assert table[f"mochi-gang-{NAMESPACE}-0"]["strategy"] == "STRICT_PACK"

    # The same job in one process: its frames, through the same MP4 encoder, decode to the same pixels.
    # (The float latents of 2 ranks vs 1 are compared in tests/pipelines/test_cfg_parallel.py: <= 1e-5.)
    runner = load_runner("tiny", tiny_checkpoint.parent)
    single = runner.generate(GenerationParams.parse("a cat surfing a wave", seed=11, **params))
    reference = write_mp4(single.frames, tmp_path / "single.mp4", params["fps"])
    assert np.array_equal(_decoded(done.artifacts["video"]), _decoded(reference))

    # Without CFG there is nothing to split: rank 0 renders alone and rank 1 idles.
    alone = gang.generate("a cat surfing a wave", seed=12, **{**params, "guidance_scale": 1.0}).wait(timeout=300)
    assert alone.status == "done", alone.error
    assert ray.get(_peer().ping.remote())["last"]["seed"] == 11


@pytest.mark.usefixtures("formed")
def test_cancel_stops_both_ranks_at_the_same_step(gang, hold):
    import ray

    gate = hold("a cancelled gang job", step=2)
    job = gang.generate("a cancelled gang job", seed=21, **GUIDED)
    gate.wait_reached()
    asked = time.monotonic()
    assert job.cancel() == "cancelled"
    last = wait_for(lambda: (s := ray.get(_peer().ping.remote())["last"])["outcome"] != "running" and s, 30,
                    "rank 1 to stop")
    stopped_s = time.monotonic() - asked
    assert last["outcome"] == "stopped" and last["seed"] == 21
    assert last["steps"] < GUIDED["num_inference_steps"]
    assert abs(last["steps"] - job.refresh().step) <= 1, (last, job.refresh().step)
    print(f"\n[gang] cancel: both ranks stopped at step {last['steps']}, {stopped_s:.2f} s after the request")
    # the gang is intact: the next guided job runs on both ranks
    nxt = gang.generate("after a cancel", seed=22, num_frames=7, height=32, width=32, num_inference_steps=2,
                        guidance_scale=4.5).wait(timeout=120)
    assert nxt.status == "done" and ray.get(_peer().ping.remote())["last"]["seed"] == 22


@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("rank", [1, 0])
def test_killing_a_rank_mid_job_reruns_the_job_on_a_fresh_gang(gang, formed, rank, hold):
    import ray

    gate = hold(f"a gang losing rank {rank}", step=3)
    job = gang.generate(f"a gang losing rank {rank}", seed=31 + rank, **GUIDED)
    gate.wait_reached()
    leader = next(w for w in gang.workers() if w["current_job"] == job.id)
    peer_pid = ray.get(_peer().ping.remote())["pid"]
    os.kill(peer_pid if rank == 1 else leader["pid"], signal.SIGKILL)
    killed = time.monotonic()
    gate.release()  # rank 0, if alive, goes on to the next collective and finds rank 1 gone
    # what the gang promises, in order: the pair re-forms as a unit, then the new rank 0 takes the job back
    _formed(gang, replacing=leader["pid"])
    formed_s = time.monotonic() - killed
    wait_for(lambda: job.refresh().attempts == 2, 60, "the re-formed gang to claim attempt 2", every=0.1)
    print(f"\n[gang] rank {rank} SIGKILLed mid-job: the pair re-formed {formed_s:.2f} s later, "
          f"attempt 2 began at {time.monotonic() - killed:.2f} s")
    final = job.wait(timeout=600)
    assert final.status == "done", final.error
    assert final.attempts == 2
    # a fresh gang: both ranks are new processes
    assert final.meta["pid"] != leader["pid"]
    assert final.meta["gang"]["peer_pid"] not in (peer_pid, None)
    folder = gang.backend.settings.artifacts_dir / gang.backend.settings.account
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(job.id)) == [f"{job.id}.mp4", f"{job.id}.png"]
    assert _decoded(final.artifacts["video"]).shape[0] == GUIDED["num_frames"]


@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_lost_while_idle_restarts_the_pair_as_a_unit(gang, formed, rank):
    """Rank 1 lost: rank 0's health check sees it and restarts itself. Rank 0 lost: the new rank 0 finds
    rank 1 still in the old group and has it restart. Either way both processes are new."""
    import ray

    leader = formed
    peer_pid = ray.get(_peer().ping.remote())["pid"]
    os.kill(peer_pid if rank == 1 else leader["pid"], signal.SIGKILL)
    _formed(gang, replacing=leader["pid"])
    job = gang.generate("after an idle loss", seed=41 + rank, num_frames=7, height=32, width=32,
                        num_inference_steps=2, guidance_scale=4.5).wait(timeout=120)
    assert job.status == "done", job.error
    assert job.meta["gang"]["peer_pid"] != peer_pid
    assert ray.get(_peer().ping.remote())["last"]["seed"] == 41 + rank


def test_gpus_per_worker_takes_1_or_2_and_says_so(monkeypatch):
    from pydantic import ValidationError

    from mochi_lab.config import Settings

    monkeypatch.setenv("MOCHI_LAB_GPUS_PER_WORKER", "2")
    assert Settings.from_env().gpus_per_worker == 2
    monkeypatch.setenv("MOCHI_LAB_GPUS_PER_WORKER", "4")
    with pytest.raises(ValidationError, match=r"gpus_per_worker\n  Input should be 1 or 2"):
        Settings.from_env()
