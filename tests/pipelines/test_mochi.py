"""The pipeline layer: the tiny Mochi goes through the real loader and is deterministic per seed."""

import json

import numpy as np
import pytest
import torch

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import JobCancelled, PipelineConfig, load_runner, resolve_source
from mochi_lab.pipelines.mochi import MochiRunner
from tests.support.jobkit import strip_pictures

TINY = {"num_frames": 7, "height": 32, "width": 48, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    return load_runner("tiny", tiny_checkpoint.parent)


def test_tiny_checkpoint_is_a_saved_diffusers_pipeline(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "MochiPipeline"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_checkpoint / part).is_dir()
    assert resolve_source("tiny", tiny_checkpoint.parent) == str(tiny_checkpoint)


def test_real_model_resolves_to_the_hub_id_with_bf16_weights():
    assert resolve_source("mochi-1-preview", "/nonexistent") == "genmo/mochi-1-preview"
    with pytest.raises(ValueError, match="mochi-1-preview, tiny"):
        resolve_source("nope", "/nonexistent")


def test_bf16_variant_loads_through_the_same_path(tiny_checkpoint, tmp_path):
    """The real checkpoint ships bf16 variant files; the loader reads them like this."""
    from diffusers import MochiPipeline

    MochiPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(
        tmp_path, variant="bf16"
    )
    assert list(tmp_path.glob("transformer/*.bf16.safetensors"))
    r = MochiRunner(str(tmp_path), PipelineConfig(variant="bf16", bf16=False))
    assert r.pipe.transformer.dtype == torch.float32  # bf16 compute is for CUDA; CPU upcasts
    frames = r.generate(GenerationParams.parse("a cat", seed=1, **TINY)).frames
    assert frames.shape == (7, 32, 48, 3)


def test_generate_returns_frames_timings_and_steps(runner):
    steps = []
    result = runner.generate(GenerationParams.parse("a cat", seed=1, **TINY), on_step=lambda i, n: steps.append((i, n)))
    assert result.frames.shape == (7, 32, 48, 3) and result.frames.dtype == np.uint8
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert set(result.timings) == {"text_s", "denoise_s", "decode_s"}
    assert all(v >= 0 for v in result.timings.values())


def test_same_seed_same_frames_other_seed_other_frames(runner):
    p = GenerationParams.parse("a cat surfing", seed=7, **TINY)
    a, b = runner.generate(p).frames, runner.generate(p).frames
    c = runner.generate(p.model_copy(update={"seed": 8})).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_raising_from_on_step_stops_at_that_step(runner):
    seen = []

    def on_step(i, n):
        seen.append(i)
        if i == 2:
            raise JobCancelled("stop")

    with pytest.raises(JobCancelled):
        runner.generate(GenerationParams.parse("a cat", seed=1, **{**TINY, "num_inference_steps": 50}), on_step)
    assert seen == [1, 2]


def test_tiny_scheduler_is_mochi_1s_field_for_field(tiny_checkpoint):
    from mochi_lab.pipelines.tiny import MOCHI_1_SCHEDULER_CONFIG

    saved = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    for field, value in MOCHI_1_SCHEDULER_CONFIG.items():
        assert saved[field] == value, field
    assert saved["invert_sigmas"] is True  # the branch diffusers keeps for Mochi alone
    extra = set(saved) - set(MOCHI_1_SCHEDULER_CONFIG) - {"_class_name", "_diffusers_version"}
    assert not extra, f"scheduler fields the reference does not pin: {extra}"


@pytest.mark.parametrize(
    "size",
    [
        {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 2},  # every minimum
        {"num_frames": 1, "height": 16, "width": 16, "num_inference_steps": 200},  # most steps
        {"num_frames": 283, "height": 16, "width": 16, "num_inference_steps": 2},  # most frames
        # each largest side alone: both at once is ~4 CPU-minutes of VAE decode and tests nothing more
        {"num_frames": 1, "height": 1280, "width": 16, "num_inference_steps": 2},
        {"num_frames": 1, "height": 16, "width": 1280, "num_inference_steps": 2},
    ],
    ids=["minimum", "max-steps", "max-frames", "max-height", "max-width"],
)
def test_boundary_params_each_make_a_video(runner, size, tmp_path):
    from mochi_lab.video import probe, write_mp4

    p = GenerationParams.parse("a cat", seed=0, fps=8, **size)
    result = runner.generate(p)
    info = probe(write_mp4(result.frames, tmp_path / "edge.mp4", p.fps))
    assert (info.frames, info.height, info.width) == (size["num_frames"], size["height"], size["width"])


# -- live previews ------------------------------------------------------------------
PREVIEWED = {"num_frames": 19, "height": 64, "width": 96, "num_inference_steps": 12}


def _pooled(video: np.ndarray, latent_frames: int) -> np.ndarray:
    from mochi_lab.pipelines.preview import _pool_to_latent_grid

    t = torch.from_numpy(video).float().permute(3, 0, 1, 2)[None] / 255
    return _pool_to_latent_grid(t, latent_frames).numpy() * 255


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float) - a.mean(axis=(0, 1, 2)), b.astype(float) - b.mean(axis=(0, 1, 2))
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def test_previews_come_as_planned_and_converge_on_the_video(runner, monkeypatch):
    import io

    from PIL import Image

    import mochi_lab.pipelines.mochi as mochi_module
    from mochi_lab.pipelines.preview import PREVIEW_BYTES, PreviewPlan, encode_strip

    x0s = []
    estimate = mochi_module.estimate_x0
    monkeypatch.setattr(mochi_module, "estimate_x0", lambda *a: x0s.append(estimate(*a)) or x0s[-1])
    got = []
    plan = PreviewPlan(emit=lambda step, frames: got.append((step, frames)), every=3, min_interval_s=0)
    result = runner.generate(GenerationParams.parse("a cat", seed=5, **PREVIEWED), preview=plan)
    assert [s for s, _ in got] == [3, 6, 9, 12]
    for _, frames in got:  # every latent frame, at 1/8 of the video's size
        assert frames.shape == (4, 8, 12, 3) and frames.dtype == np.uint8
    # the clean latent the sampler points at converges: exact at the last step, farthest at the first
    errors = [float((x - x0s[-1]).norm() / x0s[-1].norm()) for x in x0s]
    assert errors[-1] == 0 and errors == sorted(errors, reverse=True) and errors[0] > 0.05
    # the preview looks like the decoded video (de-meaned correlation), at the end at least as at the start
    first, last = (_corr(frames, _pooled(result.frames, 4)) for _, frames in (got[0], got[-1]))
    assert last > 0.15 and last >= first - 0.02, (first, last)
    strip = encode_strip(got[-1][1])
    image = Image.open(io.BytesIO(strip))
    assert len(strip) <= PREVIEW_BYTES and image.format == "WEBP" and strip_pictures(image) == 4 and image.size == (12, 8)


def test_the_preview_plan_defaults_to_a_tenth_of_the_steps_and_one_a_second():
    from mochi_lab.pipelines.preview import PreviewPlan

    plan = PreviewPlan(emit=lambda *a: None, min_interval_s=0)
    assert [s for s in range(1, 65) if plan.due(s, 64)] == [6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 64]
    slow = PreviewPlan(emit=lambda *a: None, every=1, min_interval_s=3600)
    assert [s for s in range(1, 11) if slow.due(s, 10)] == [1]  # then nothing for an hour


def test_the_preview_map_is_fitted_on_the_pipelines_vae(runner):
    m = runner.preview_map
    assert m.weight.shape == (runner.pipe.transformer.config.in_channels, 3) and m.bias.shape == (3,)
    assert 0 < m.r2 <= 1  # held out: better than the mean colour alone
    assert runner.preview_map is m  # fitted once per loaded pipeline
