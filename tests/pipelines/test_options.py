"""PipelineConfig's speed options, run for real on the tiny Mochi: First Block Cache and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import JobCancelled, PipelineConfig, load_runner

# 16 steps: enough consecutive steps for the cache to find similar ones
PARAMS = GenerationParams.parse("a cat surfing a wave", seed=3, num_frames=7, height=32, width=48,
                                num_inference_steps=16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return load_runner("tiny", tiny_checkpoint.parent).generate(PARAMS)


def test_first_block_cache_at_threshold_0_gives_the_frames_of_no_cache(tiny_checkpoint, eager):
    runner = load_runner("tiny", tiny_checkpoint.parent, PipelineConfig(step_cache_threshold=0))
    out = runner.generate(PARAMS)
    assert out.info["step_cache_calls"] == 16 and out.info["step_cache_skips"] == 0  # the hooks ran
    assert torch.equal(out.latents, eager.latents)
    assert np.array_equal(out.frames, eager.frames)


def test_first_block_cache_skips_transformer_calls_and_keeps_the_video_close(tiny_checkpoint, eager):
    runner = load_runner("tiny", tiny_checkpoint.parent, PipelineConfig(step_cache_threshold=0.3))
    out = runner.generate(PARAMS)
    skips = out.info["step_cache_skips"]
    quality = psnr(out.frames, eager.frames)
    print(f"First Block Cache at 0.3: skipped {skips}/{out.info['step_cache_calls']} transformer calls, "
          f"PSNR {quality:.1f} dB against no cache")
    assert out.info["step_cache_calls"] == 16 and skips >= 4
    assert not np.array_equal(out.frames, eager.frames)  # skipping changed something...
    assert quality >= 35.0  # ...but little

    # A job stopped mid-way leaves the hooks' residuals behind; the next job must not compare with them.
    def stop(step: int, total: int) -> None:
        if step == 5:
            raise JobCancelled("test")

    with pytest.raises(JobCancelled):
        runner.generate(PARAMS.model_copy(update={"height": 48}), on_step=stop)
    again = runner.generate(PARAMS)
    assert np.array_equal(again.frames, out.frames) and again.info["step_cache_skips"] == skips


@pytest.mark.usefixtures("torch_compile")
def test_compile_runs_compiled_blocks_and_gives_the_eager_frames(tiny_checkpoint, eager):
    from torch._dynamo.utils import counters

    counters.clear()
    runner = load_runner("tiny", tiny_checkpoint.parent, PipelineConfig(compile=True))
    out = runner.generate(PARAMS)
    assert counters["stats"]["unique_graphs"] >= 1  # inductor really compiled the blocks
    diff = (out.latents - eager.latents).abs().max().item()
    print(f"compile: max abs latent difference vs eager {diff:.3g}")
    assert diff <= 1e-4
    assert np.abs(out.frames.astype(int) - eager.frames.astype(int)).max() <= 1
