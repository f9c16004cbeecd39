"""A 4-GPU worker (`gpus_per_worker=4`) on a real Ray with logical GPUs: a gang of four actors (gloo on CPU) in
one STRICT_PACK placement group. A guided job runs CFG 2 x SP 2 (two halves of the gang, one sample each, each
half splitting the tokens), a job without CFG SP 4; losing a peer mid-job re-forms all four and runs the job
again, once. The 2-rank gang is tests/pool/test_gang.py.

The gang has its own node (4 logical GPUs), namespace and SQLite store (tests/support/gangkit.py). A test that
acts mid-denoise holds rank 0 at a gate (the peers wait for it in the step's collective).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.faults_helpers import wait_for
from tests.support.gangkit import assert_single_process_video, formed, gang_pool, pings
from tests.support.jobkit import TINY

NAMESPACE = "mochi_gang4_test"
RANKS = 4
# 25 frames at 48x48: 5 latent frames x 3 x 3 = 45 visual tokens, which neither 2 nor 4 divides (SP pads
# them), and a decode split over 2 of the ranks (2 latent frames of causal context each)
PADDED = {**TINY, "num_frames": 25, "height": 48, "width": 48, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def gang4(ray_cluster, tmp_path_factory):
    with gang_pool(ray_cluster, NAMESPACE, RANKS, tmp_path_factory.mktemp("gang4-data")) as cluster:
        yield cluster


@pytest.mark.parametrize("guidance, layout", [(4.5, "cfg2xsp2"), (1.0, "cfg1xsp4")])
def test_a_job_on_four_ranks_gives_the_single_process_video(gang4, tiny_checkpoint, tmp_path, guidance, layout):
    import ray

    formed(gang4)
    params = {**PADDED, "guidance_scale": guidance}
    seed = 61 if guidance > 1 else 62
    done = gang4.generate("a cat surfing a wave", seed=seed, **params).wait(timeout=600)
    assert done.status == "done", done.error
    meta = done.meta
    cfg, sp = (2, 2) if guidance > 1 else (1, 4)
    assert (meta["layout"], meta["cfg_degree"], meta["sp_degree"], meta["ranks"]) == (layout, cfg, sp, RANKS)
    assert meta["decode_ranks"] == 2
    peers = pings(NAMESPACE, RANKS)
    assert meta["gang"]["peers"] == {f"mochi-peer-0-{rank}": p["pid"] for rank, p in enumerate(peers, start=1)}
    for p in peers:  # every peer ran its share of this job, in rank 0's layout, and moved tokens over SP
        last = p["last"]
        assert (last["seed"], last["layout"], last["outcome"], last["stats"]["calls"]) == (seed, layout, "done", 4)
        assert last["stats"]["a2a_s"] > 0 and (last["stats"]["gather_s"] > 0) == (cfg == 2)
    bundles = [row for row in ray.util.placement_group_table().values() if row["name"] == f"mochi-gang-{NAMESPACE}-0"]
    assert bundles[0]["strategy"] == "STRICT_PACK" and len(bundles[0]["bundles"]) == RANKS
    assert_single_process_video(done, tiny_checkpoint.parent, tmp_path, "a cat surfing a wave", seed, params)


@pytest.mark.usefixtures("fault_injection")
def test_killing_a_peer_mid_job_reruns_the_job_once_on_a_fresh_gang_of_four(gang4, hold):
    """Rank 3 is in the other CFG half, in an SP group without rank 0: its loss reaches rank 0 through the ranks
    whose collectives fail in turn (each exits), and every rank restarts."""
    leader = formed(gang4)
    prompt = "a gang of four losing rank 3"
    gate = hold(prompt, step=3)
    job = gang4.generate(prompt, seed=71, **{**TINY, "num_inference_steps": 8, "guidance_scale": 4.5})
    gate.wait_reached()
    before = [p["pid"] for p in pings(NAMESPACE, RANKS)]
    os.kill(before[2], signal.SIGKILL)
    killed = time.monotonic()
    gate.release()  # rank 0 goes on to the step's all-reduce and finds rank 3 gone
    formed(gang4, replacing=leader["pid"])
    formed_s = time.monotonic() - killed
    wait_for(lambda: job.refresh().attempts == 2, 60, "the re-formed gang to claim attempt 2", every=0.1)
    print(f"\n[gang4] rank 3 SIGKILLed mid-job: the gang re-formed {formed_s:.2f} s later, "
          f"attempt 2 began at {time.monotonic() - killed:.2f} s")
    final = job.wait(timeout=600)
    assert final.status == "done", final.error
    assert final.attempts == 2 and final.meta["layout"] == "cfg2xsp2"
    # a fresh gang: all four ranks are new processes
    assert final.meta["pid"] != leader["pid"]
    after = list(final.meta["gang"]["peers"].values())
    assert len(after) == 3 and not set(after) & set(before), (before, after)
