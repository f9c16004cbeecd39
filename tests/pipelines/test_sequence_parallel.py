"""Sequence parallelism, CFG x SP layouts, a First Block Cache ranks agree on, and the split VAE decode, on
gloo ranks (separate processes, tiny Mochi), each against one process.

Tolerances, float32 on CPU: latents within 1e-5 of one process (the splits reorder no reduction inside a head
or a token; what differs is the matrix kernels' blocking for other shapes, seen at ~5e-7); uint8 frames within
1 level (rounding of values that differ by ~1e-6 on either side of a level's edge).

Sizes: 85 frames at 48x48 are 15 x 3 x 3 = 135 visual tokens, which neither 2 nor 4 divides (the tiny model's
analogue of 85 frames at 848x480, 23,850 tokens, which 4 and 8 do not divide); 7 frames at 32x48 are 12 tokens,
which both divide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import PipelineConfig, load_runner
from mochi_lab.pipelines.cfg_parallel import Layout, LayoutError, default_layout
from tests.support.lora import EVERY_SPLIT, make_adapter
from tests.support.ports import free_port

RANK = Path(__file__).parents[1] / "support" / "gang_rank.py"
ROOT = Path(__file__).resolve().parents[2]
PADDED = {"num_frames": 85, "height": 48, "width": 48}  # 135 tokens
EVEN = {"num_frames": 7, "height": 32, "width": 48}  # 12 tokens
LATENT_TOL = 1e-5


def run_gang(tmp_path: Path, cache_dir: Path, world: int, spec: dict) -> list:
    """Start `world` rank processes on `spec` and return what each saved."""
    spec_path = tmp_path / f"spec-{world}.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"w{world}-rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(RANK), str(r), str(world), str(port), str(cache_dir), str(outs[r]),
                               str(spec_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
    return [torch.load(o, weights_only=False) for o in outs]


def job(steps: int = 3, guidance: float = 1.0, **size) -> dict:
    return {"seed": 3, "num_inference_steps": steps, "guidance_scale": guidance, **size}


def reference(cache_dir: Path, params: dict, threshold: float | None = None):
    runner = load_runner("tiny", cache_dir, PipelineConfig(step_cache_threshold=threshold))
    return runner.generate(GenerationParams.parse("a cat surfing a wave", **params))


def assert_same_video(ranks: list, index: int, ref) -> float:
    """Every rank ends with the single process's latents; rank 0 alone holds the frames."""
    diffs = [(r[index]["latents"] - ref.latents).abs().max().item() for r in ranks]
    assert max(diffs) <= LATENT_TOL, diffs
    frames = ranks[0][index]["frames"].numpy().astype(int)
    assert frames.shape == ref.frames.shape
    assert np.abs(frames - ref.frames.astype(int)).max() <= 1
    assert all(len(r[index]["frames"]) == 0 for r in ranks[1:])
    return max(diffs)


@pytest.fixture(scope="module")
def two_ranks(gloo_ranks, tiny_checkpoint, tmp_path_factory) -> tuple[list, list[dict]]:
    jobs = [
        {"params": job(**PADDED)},  # no CFG: SP over both ranks, padded
        {"params": job(**EVEN)},  # no CFG: SP over both ranks, no padding
        {"params": job(guidance=4.5, **EVEN)},  # guided: CFG 2 x SP 1
        {"params": job(guidance=4.5, **PADDED), "layout": [1, 2]},  # the guided batch of 2 through SP 2, padded
        {"params": job(num_frames=1, height=16, width=16)},  # 1 visual token for 2 SP ranks
        {"params": job(guidance=1.0, **EVEN), "layout": [2, 1]},  # a CFG split for a job without CFG
        {"params": job(steps=6, **EVEN), "stop_at": [1, 2]},  # rank 1 stops at step 2
    ]
    return run_gang(tmp_path_factory.mktemp("gang2"), tiny_checkpoint.parent, 2, {"jobs": jobs}), jobs


@pytest.fixture(scope="module")
def four_ranks(gloo_ranks, tiny_checkpoint, tmp_path_factory) -> tuple[list, list[dict]]:
    jobs = [
        {"params": job(guidance=4.5, **PADDED)},  # guided: CFG 2 x SP 2, padded
        {"params": job(**PADDED)},  # no CFG: SP 4, padded
        {"params": job(**EVEN)},  # no CFG: SP 4, no padding
        {"params": job(steps=6, guidance=4.5, **EVEN), "stop_at": [2, 2]},  # rank 2 (the second CFG group) stops
    ]
    return run_gang(tmp_path_factory.mktemp("gang4"), tiny_checkpoint.parent, 4, {"jobs": jobs}), jobs


@pytest.mark.parametrize("index, layout, padded", [(0, "cfg1xsp2", True), (1, "cfg1xsp2", False),
                                                   (2, "cfg2xsp1", False), (3, "cfg1xsp2", True)])
def test_two_ranks_give_the_single_process_video(two_ranks, tiny_checkpoint, index, layout, padded):
    ranks, jobs = two_ranks
    assert [r[index]["info"]["layout"] for r in ranks] == [layout] * 2
    diff = assert_same_video(ranks, index, reference(tiny_checkpoint.parent, jobs[index]["params"]))
    stats = ranks[0][index]["stats"]
    if layout.endswith("sp2"):  # the tokens really moved between the ranks
        assert stats["a2a_s"] > 0 and stats["sp_gather_s"] > 0 and stats["gather_s"] == 0
    else:
        assert stats["gather_s"] > 0 and stats["a2a_s"] == 0
    # the decode is split over the ranks that get at least the decoders' causal context (2 latent frames) each
    latent_frames = (jobs[index]["params"]["num_frames"] - 1) // 6 + 1
    assert [r[index]["info"]["decode_ranks"] for r in ranks] == [min(2, latent_frames // 2)] * 2
    print(f"{layout} {'padded' if padded else 'even'}: max abs latent difference vs 1 process {diff:.3g}")


@pytest.mark.parametrize("index, layout", [(0, "cfg2xsp2"), (1, "cfg1xsp4"), (2, "cfg1xsp4")])
def test_four_ranks_give_the_single_process_video(four_ranks, tiny_checkpoint, index, layout):
    ranks, jobs = four_ranks
    assert [r[index]["info"]["layout"] for r in ranks] == [layout] * 4
    diff = assert_same_video(ranks, index, reference(tiny_checkpoint.parent, jobs[index]["params"]))
    print(f"{layout} job {index}: max abs latent difference vs 1 process {diff:.3g}")


def test_a_job_without_cfg_uses_every_rank(two_ranks):
    """The second GPU of a 2-GPU worker is not idle for a job without CFG: it holds half the tokens."""
    ranks, _ = two_ranks
    info = ranks[1][0]["info"]
    assert (info["sp_degree"], info["cfg_degree"], info["ranks"]) == (2, 1, 2)
    assert ranks[1][0]["stats"]["calls"] == 3 and ranks[1][0]["stats"]["a2a_s"] > 0


def test_layout_limits_are_refused_before_any_work(two_ranks):
    ranks, _ = two_ranks
    for r in ranks:  # on every rank alike, before a step
        assert r[4]["outcome"].startswith("refused: layout cfg1xsp2: the video has 1 visual tokens, fewer than "
                                          "its 2 SP ranks")
        assert "more ranks than tokens" in r[4]["outcome"] and r[4]["steps"] == []
        assert r[5]["outcome"] == ("refused: layout cfg2xsp1 splits the CFG batch, and this job has no CFG "
                                   "(guidance_scale <= 1)") and r[5]["steps"] == []
    # the gang is still whole after a refusal: the next job runs on both ranks
    assert ranks[0][6]["steps"] == ranks[1][6]["steps"] == [1, 2]


def test_a_stop_on_any_rank_stops_every_rank_at_the_same_step(two_ranks, four_ranks):
    for ranks, index, stopper in ((two_ranks[0], 6, 1), (four_ranks[0], 3, 2)):
        for rank, r in enumerate(ranks):
            assert r[index]["steps"] == [1, 2], (rank, r[index])
            expected = ("cancelled: cancelled by the test" if rank == stopper
                        else "cancelled: stopped by another rank at step 2/6")
            assert r[index]["outcome"] == expected
            assert r[index]["stats"]["calls"] == 2  # nobody started a third transformer call


@pytest.mark.usefixtures("gloo_ranks")
def test_ranks_agree_on_the_first_block_cache(tiny_checkpoint, tmp_path):
    """Rank 0 would compute every call (threshold 0), rank 1 skip every one it can (1e9): left alone they
    diverge (under SP the ranks would wait in different collectives). Every rank decides on the residual of
    the whole batch and sequence and the smallest threshold, so they take the same decisions, the same as
    one process at that threshold, and the video is one process's."""
    ps = [job(steps=12, **PADDED), job(steps=12, guidance=4.5, **EVEN)]  # SP 2, then CFG 2
    spec = {"jobs": [{"params": p} for p in ps], "step_cache_threshold": {"0": 0.3, "1": 1e9}, "timeout_s": 30}
    ranks = run_gang(tmp_path, tiny_checkpoint.parent, 2, spec)
    for index, params in enumerate(ps):
        ref = reference(tiny_checkpoint.parent, params, threshold=0.3)
        skips = [r[index]["info"]["step_cache_skips"] for r in ranks]
        assert skips == [ref.info["step_cache_skips"]] * 2 and 0 < skips[0] < 11, (skips, ref.info)
        assert_same_video(ranks, index, ref)


@pytest.mark.usefixtures("gloo_ranks")
def test_a_lora_on_every_rank_gives_one_process_video_with_it_and_the_base_after(tiny_checkpoint, tmp_path):
    """Each rank loads the same adapter file into its pipeline and sets it for the job at the job's scale (what a
    gang's ranks do); SP 2 (padded) and CFG 2 give one process's latents with that adapter, and the job after,
    with it disabled, one process's base latents."""
    import hashlib

    adapter = make_adapter(tmp_path / "every.safetensors", seed=4, targets=EVERY_SPLIT)
    lora = [[str(adapter), 0.8]]
    ps = [job(**PADDED), job(guidance=4.5, **EVEN), job(**PADDED)]
    spec = {"jobs": [{"params": ps[0], "lora": lora}, {"params": ps[1], "lora": lora}, {"params": ps[2]}]}
    ranks = run_gang(tmp_path, tiny_checkpoint.parent, 2, spec)
    assert [r[1]["info"]["layout"] for r in ranks] == ["cfg2xsp1"] * 2
    assert [r[0]["info"]["layout"] for r in ranks] == ["cfg1xsp2"] * 2

    runner = load_runner("tiny", tiny_checkpoint.parent)
    data = adapter.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    runner.lora.load(sha, lambda: data)
    for index in (0, 1):
        with runner.lora.applied([(sha, 0.8)]):
            ref = runner.generate(GenerationParams.parse("a cat surfing a wave", **ps[index]))
        base = reference(tiny_checkpoint.parent, ps[index])
        assert (ref.latents - base.latents).abs().max().item() > 100 * LATENT_TOL  # the adapter changes the video
        assert_same_video(ranks, index, ref)
    assert_same_video(ranks, 2, reference(tiny_checkpoint.parent, ps[2]))


@pytest.mark.usefixtures("gloo_ranks")
def test_the_split_decode_gives_the_single_decode_with_less_memory_per_rank(tiny_checkpoint, tmp_path):
    """31 frames at 96x288 (6 latent frames, two spatial tiles): the decode on 2 ranks (3 latent frames each,
    every causal convolution taking its past frames from the rank before) against one process."""
    spec = {"decode": {"frames": 31, "height": 96, "width": 288, "seed": 1}}
    one = run_gang(tmp_path, tiny_checkpoint.parent, 1, spec)[0]
    two = run_gang(tmp_path, tiny_checkpoint.parent, 2, spec)
    assert two[1]["frames"] is None and two[0]["memory"]["decode_ranks"] == 2
    frames, single = two[0]["frames"].numpy().astype(int), one["frames"].numpy().astype(int)
    assert frames.shape == single.shape == (31, 96, 288, 3)
    assert np.abs(frames - single).max() <= 1
    assert two[1]["stats"]["halo_s"] > 0  # the frames' context really came from the other rank
    peaks = [r["memory"]["decode_peak_bytes"] for r in two]
    alone = one["memory"]["decode_peak_bytes"]
    # half the frames each: each rank's peak well under one process's (measured: 0.54 and 0.63 of it)
    assert max(peaks) < 0.8 * alone, (peaks, alone)
    print(f"decode peak RSS above its start: 1 process {alone / 2**20:.0f} MiB; 2 ranks "
          f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB")


# -- configuration, in one process -------------------------------------------------------------------------------
def test_a_layout_that_does_not_divide_the_heads_is_refused_naming_the_limit():
    with pytest.raises(LayoutError, match=r"layout cfg1xsp3: the SP degree must divide the transformer's 4 "
                                          r"attention heads \(allowed: \[1, 2, 4\]\)"):
        Layout(sp=3).check(heads=4)
    with pytest.raises(LayoutError, match="SP degree must divide the transformer's 24 attention heads "
                                          r"\(allowed: \[1, 2, 3, 4, 6, 8, 12, 24\]\)"):
        Layout(cfg=2, sp=16).check(heads=24)
    with pytest.raises(LayoutError, match="the CFG degree must be 1 or 2"):
        Layout(cfg=4, sp=2).check(heads=24)
    Layout(cfg=2, sp=4).check(heads=24, tokens=23_850)  # 8 H100s on 85 frames: padded, allowed
    with pytest.raises(LayoutError, match="more ranks than tokens"):
        Layout(sp=8).check(heads=24, tokens=7)


def test_default_layouts():
    assert default_layout(8, guided=True) == Layout(cfg=2, sp=4)
    assert default_layout(8, guided=False) == Layout(cfg=1, sp=8)
    assert default_layout(2, guided=True) == Layout(cfg=2, sp=1)
    assert default_layout(2, guided=False) == Layout(cfg=1, sp=2)
    assert default_layout(1, guided=True) == Layout(cfg=1, sp=1)
