"""CFG parallelism on two gloo ranks (two processes, tiny Mochi): the same video as one process, and a
stop on rank 0 stops rank 1 at the same step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import load_runner
from tests.support.ports import free_port

PAIR = Path(__file__).parents[1] / "support" / "cfg_pair.py"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("gloo_ranks")


def _run_pair(tmp_path: Path, cache_dir: Path, *extra: str) -> list[dict]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(PAIR), str(r), str(port), str(cache_dir), str(outs[r]), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [torch.load(o) for o in outs]


def test_two_ranks_give_the_single_process_video(tiny_checkpoint, tmp_path):
    rank0, rank1 = _run_pair(tmp_path, tiny_checkpoint.parent, "--steps", "4")
    runner = load_runner("tiny", tiny_checkpoint.parent)
    ref = runner.generate(GenerationParams.parse("a cat surfing a wave", seed=3, num_frames=7, height=32,
                                                 width=48, num_inference_steps=4, guidance_scale=4.5))
    # each rank computed one half of every step's CFG batch and gathered the other
    assert rank0["stats"]["calls"] == rank1["stats"]["calls"] == 4
    diff = (rank0["latents"] - ref.latents).abs().max().item()
    assert diff <= 1e-5, diff
    assert torch.equal(rank0["latents"], rank1["latents"])
    assert np.abs(rank0["frames"].numpy().astype(int) - ref.frames.astype(int)).max() <= 1
    print(f"max abs latent difference, 2 ranks vs 1 process: {diff:.3g}")


def test_a_stop_on_rank_0_stops_rank_1_at_the_same_step(tiny_checkpoint, tmp_path):
    rank0, rank1 = _run_pair(tmp_path, tiny_checkpoint.parent, "--steps", "6", "--cancel-at", "2")
    assert rank0["outcome"] == "cancelled: cancelled by the test"
    assert rank1["outcome"].startswith("cancelled: stopped by another rank at step 2/6")
    assert rank0["steps"] == rank1["steps"] == [1, 2]
    assert rank0["stats"]["calls"] == rank1["stats"]["calls"] == 2


def test_an_error_in_rank_0s_own_step_work_stops_rank_1_at_the_same_step(tiny_checkpoint, tmp_path):
    """Rank 0's preview (work rank 1 does not share) fails at step 3: rank 1 stops at step 3 too, rather
    than waiting in step 4's all-gather until the collective times out."""
    rank0, rank1 = _run_pair(tmp_path, tiny_checkpoint.parent, "--steps", "6", "--preview-fails-at", "3")
    assert rank0["outcome"] == "failed: the preview could not be written"
    assert rank1["outcome"].startswith("cancelled: stopped by another rank at step 3/6")
    assert rank0["previews"] == [1, 2, 3] and rank1["previews"] == []
    # rank 0 failed before its progress report of step 3; rank 1 made its own, then stopped
    assert (rank0["steps"], rank1["steps"]) == ([1, 2], [1, 2, 3])
    assert rank0["stats"]["calls"] == rank1["stats"]["calls"] == 3
