"""2-GPU workers (`gpus_per_worker=2`) on a real Ray with logical GPUs: a gang of two actors (gloo on CPU)
renders one video on both, a guided job as CFG 2 x SP 1 (the CFG batch split), one without CFG as SP 2 (the
tokens split). Gangs of 4 are tests/pool/test_gang_shapes.py.

The gang has its own node (2 logical GPUs), namespace and SQLite store (tests/support/gangkit.py). A test that
acts mid-denoise holds rank 0 at a gate (rank 1 waits for it in the step's collective).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.support.faults_helpers import wait_for
from tests.support.gangkit import assert_single_process_video, decoded, gang_pool, pings
from tests.support.gangkit import formed as gang_formed
from tests.support.jobkit import TINY
from tests.support.lora import EVERY_SPLIT, make_adapter

NAMESPACE = "mochi_gang_test"
# a guided job (both ranks work) with steps before and after the gates the tests hold it at
GUIDED = {**TINY, "num_inference_steps": 8, "guidance_scale": 4.5}
# 25 frames at 48x48: 5 latent frames x 3 x 3 = 45 visual tokens, which 2 does not divide (SP pads them), and
# a decode split over both ranks (2 latent frames of causal context each)
PADDED = {**TINY, "num_frames": 25, "height": 48, "width": 48, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def gang(ray_cluster, tmp_path_factory):
    with gang_pool(ray_cluster, NAMESPACE, 2, tmp_path_factory.mktemp("gang-data")) as cluster:
        yield cluster


@pytest.fixture
def formed(gang) -> dict:
    """The gang, formed: each test starts on a pair that has finished forming, whatever the test before
    it did to the last one."""
    return gang_formed(gang)


def _peer() -> dict:
    return pings(NAMESPACE, 2)[0]


@pytest.mark.parametrize("guidance, layout", [(4.5, "cfg2xsp1"), (1.0, "cfg1xsp2")])
def test_a_job_on_two_ranks_gives_the_single_process_video(gang, formed, tiny_checkpoint, tmp_path, guidance,
                                                           layout):
    """Both ranks work on every job: a guided one splits its CFG batch, one without CFG its tokens (the second
    GPU no longer idles for it)."""
    import ray

    params = {**PADDED, "guidance_scale": guidance}
    seed = 11 if guidance > 1 else 12
    done = gang.generate("a cat surfing a wave", seed=seed, **params).wait(timeout=300)
    assert done.status == "done", done.error
    meta = done.meta
    assert (meta["layout"], meta["cfg_degree"], meta["sp_degree"], meta["ranks"]) == (
        layout, 2 if guidance > 1 else 1, 1 if guidance > 1 else 2, 2)
    assert meta["decode_ranks"] == 2 and meta["gang"]["peers"] == {"mochi-peer-0-1": _peer()["pid"]}
    last = _peer()["last"]
    assert (last["seed"], last["layout"], last["outcome"], last["decode_ranks"]) == (seed, layout, "done", 2)
    assert last["stats"]["calls"] == 4  # rank 1 ran every transformer call of its share
    moved = "gather_s" if guidance > 1 else "a2a_s"  # what crossed between the ranks: the CFG halves, or tokens
    assert last["stats"][moved] > 0 and last["stats"]["halo_s"] > 0
    table = {row["name"]: row for row in ray.util.placement_group_table().values()}
    assert table[f"mochi-gang-{NAMESPACE}-0"]["strategy"] == "STRICT_PACK"
    assert_single_process_video(done, tiny_checkpoint.parent, tmp_path, "a cat surfing a wave", seed, params)


def test_every_rank_applies_a_jobs_lora_and_disables_it_after(gang, formed, tiny_checkpoint, tmp_path):
    """A job with an adapter: rank 0 and its peer load the same file (the account's, by its sha256) and set it at
    the job's scale; the video is one process's with that adapter, in the CFG layout and the SP one. The same job
    without it, after them, is the video it made before any adapter was loaded, bit for bit: every rank
    disabled it."""
    params = {**PADDED, "guidance_scale": 4.5}
    before = gang.generate("a cat surfing a wave", seed=61, **params).wait(timeout=300)
    assert before.status == "done", before.error
    adapter = make_adapter(tmp_path / "every.safetensors", seed=4, targets=EVERY_SPLIT)
    sha = gang.adapters.upload(adapter, name="every")["sha256"]
    for guidance, layout, seed in ((4.5, "cfg2xsp1", 61), (1.0, "cfg1xsp2", 62)):
        params = {**PADDED, "guidance_scale": guidance}
        done = gang.generate("a cat surfing a wave", seed=seed, lora=[("every", 0.8)], **params).wait(timeout=300)
        assert done.status == "done", done.error
        assert done.meta["layout"] == layout and done.meta["lora"][0]["sha256"] == sha
        last = _peer()["last"]
        assert (last["seed"], last["outcome"], last["lora"]) == (seed, "done", [sha])
        assert_single_process_video(done, tiny_checkpoint.parent, tmp_path, "a cat surfing a wave", seed, params,
                                    lora=(adapter, 0.8))
    params = {**PADDED, "guidance_scale": 4.5}
    after = gang.generate("a cat surfing a wave", seed=61, force=True, **params).wait(timeout=300)
    assert after.status == "done" and after.id != before.id, after.error
    assert "lora" not in after.meta and _peer()["last"]["lora"] == []
    assert np.array_equal(decoded(after.artifacts["video"]), decoded(before.artifacts["video"]))


@pytest.mark.usefixtures("formed")
def test_a_video_with_fewer_tokens_than_sp_ranks_is_refused_before_any_work(gang):
    """1 frame at 16x16 is 1 visual token: SP 2 cannot split it. The job fails at once, not retried, and the
    peer never starts it."""
    before = _peer()["last"]
    job = gang.generate("one token", seed=51, num_frames=1, height=16, width=16, num_inference_steps=2,
                        guidance_scale=1.0).wait(timeout=120)
    assert job.status == "failed" and job.attempts == 1
    assert job.error.startswith("layout cfg1xsp2: the video has 1 visual tokens, fewer than its 2 SP ranks")
    assert _peer()["last"] == before
    # the gang is whole: the next job runs on both ranks
    nxt = gang.generate("after a refusal", seed=52, **TINY).wait(timeout=120)
    assert nxt.status == "done" and _peer()["last"]["seed"] == 52


@pytest.mark.usefixtures("formed")
def test_cancel_stops_both_ranks_at_the_same_step(gang, hold):
    gate = hold("a cancelled gang job", step=2)
    job = gang.generate("a cancelled gang job", seed=21, **GUIDED)
    gate.wait_reached()
    asked = time.monotonic()
    assert job.cancel() == "cancelled"
    last = wait_for(lambda: (s := _peer()["last"])["outcome"] != "running" and s, 30, "rank 1 to stop")
    stopped_s = time.monotonic() - asked
    assert last["outcome"] == "stopped" and last["seed"] == 21
    assert last["steps"] < GUIDED["num_inference_steps"]
    assert abs(last["steps"] - job.refresh().step) <= 1, (last, job.refresh().step)
    print(f"\n[gang] cancel: both ranks stopped at step {last['steps']}, {stopped_s:.2f} s after the request")
    # the gang is intact: the next guided job runs on both ranks
    nxt = gang.generate("after a cancel", seed=22, num_frames=7, height=32, width=32, num_inference_steps=2,
                        guidance_scale=4.5).wait(timeout=120)
    assert nxt.status == "done" and _peer()["last"]["seed"] == 22


@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("rank", [1, 0])
def test_killing_a_rank_mid_job_reruns_the_job_on_a_fresh_gang(gang, formed, rank, hold):
    gate = hold(f"a gang losing rank {rank}", step=3)
    job = gang.generate(f"a gang losing rank {rank}", seed=31 + rank, **GUIDED)
    gate.wait_reached()
    leader = next(w for w in gang.workers() if w["current_job"] == job.id)
    peer_pid = _peer()["pid"]
    os.kill(peer_pid if rank == 1 else leader["pid"], signal.SIGKILL)
    killed = time.monotonic()
    gate.release()  # rank 0, if alive, goes on to the next collective and finds rank 1 gone
    # what the gang promises, in order: the pair re-forms as a unit, then the new rank 0 takes the job back
    gang_formed(gang, replacing=leader["pid"])
    formed_s = time.monotonic() - killed
    wait_for(lambda: job.refresh().attempts == 2, 60, "the re-formed gang to claim attempt 2", every=0.1)
    print(f"\n[gang] rank {rank} SIGKILLed mid-job: the pair re-formed {formed_s:.2f} s later, "
          f"attempt 2 began at {time.monotonic() - killed:.2f} s")
    final = job.wait(timeout=600)
    assert final.status == "done", final.error
    assert final.attempts == 2
    # a fresh gang: both ranks are new processes
    assert final.meta["pid"] != leader["pid"]
    assert final.meta["gang"]["peers"]["mochi-peer-0-1"] not in (peer_pid, None)
    folder = gang.backend.settings.artifacts_dir / gang.backend.settings.account
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(job.id)) == [f"{job.id}.mp4", f"{job.id}.png"]
    assert decoded(final.artifacts["video"]).shape[0] == GUIDED["num_frames"]


@pytest.mark.usefixtures("fault_injection")
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_lost_while_idle_restarts_the_pair_as_a_unit(gang, formed, rank):
    """Rank 1 lost: rank 0's health check sees it and restarts itself. Rank 0 lost: the new rank 0 finds
    rank 1 still in the old group and has it restart. Either way both processes are new."""
    leader = formed
    peer_pid = _peer()["pid"]
    os.kill(peer_pid if rank == 1 else leader["pid"], signal.SIGKILL)
    gang_formed(gang, replacing=leader["pid"])
    job = gang.generate("after an idle loss", seed=41 + rank, num_frames=7, height=32, width=32,
                        num_inference_steps=2, guidance_scale=4.5).wait(timeout=120)
    assert job.status == "done", job.error
    assert job.meta["gang"]["peers"]["mochi-peer-0-1"] != peer_pid
    assert _peer()["last"]["seed"] == 41 + rank


def test_a_gang_the_controller_retires_frees_its_peer_and_placement_group(gang, formed):
    """Scaling to zero retires the idle rank 0; its peer and placement group go with it, so the node's GPUs are
    free and the autoscaler can take the node away. Then the pool starts the gang again."""
    import ray

    from mochi_lab.config import ScalingConfig
    from mochi_lab.pool.controller import PoolController
    from mochi_lab.pool.gang import group_name

    pool = gang.backend.pool
    controller = PoolController(pool, gang.backend.store,
                                ScalingConfig(min_workers=0, max_workers=1, idle_timeout_s=0, cooldown_s=0))

    def freed() -> bool:
        controller.tick()
        table = {row["name"]: row for row in ray.util.placement_group_table().values()}
        names = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                 if entry["namespace"] == NAMESPACE}
        return not names and table[group_name(NAMESPACE, 0)]["state"] == "REMOVED"

    wait_for(freed, 120, "the retired gang's rank 0, peer and placement group to go", every=0.2)
    pool.ensure(1)
    assert gang_formed(gang)["pid"] != formed["pid"]


def test_gpus_per_worker_takes_1_2_4_or_8_and_says_so(monkeypatch):
    from pydantic import ValidationError

    from mochi_lab.config import Settings

    for gpus in ("2", "4", "8"):
        monkeypatch.setenv("MOCHI_LAB_GPUS_PER_WORKER", gpus)
        assert Settings.from_env().gpus_per_worker == int(gpus)
    for gpus in ("3", "16"):
        monkeypatch.setenv("MOCHI_LAB_GPUS_PER_WORKER", gpus)
        with pytest.raises(ValidationError, match=r"gpus_per_worker\n  Input should be 1, 2, 4 or 8"):
            Settings.from_env()
    with pytest.raises(ValidationError, match=r"gpus_per_worker\n  Input should be 1, 2, 4 or 8"):
        Settings(gpus_per_worker=3)
