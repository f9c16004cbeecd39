"""PipelineConfig(attention=...): SDPA by default; FlashAttention and SageAttention through processors, refused
when configured where their library is missing, and refused on a CPU, where only SDPA runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from pydantic import ValidationError

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import PipelineConfig, load_runner
from mochi_lab.pipelines.attention import GangAttention, attention_kernel

TINY_JOB = dict(seed=5, num_frames=13, height=32, width=48, num_inference_steps=3, guidance_scale=4.5)


def test_sdpa_is_the_default_and_keeps_diffusers_processor(tiny_checkpoint):
    assert PipelineConfig().attention == "sdpa"
    runner = load_runner("tiny", tiny_checkpoint.parent)
    assert {type(b.attn1.processor).__name__ for b in runner.pipe.transformer.transformer_blocks} == {
        "MochiAttnProcessor2_0"}


@pytest.mark.parametrize("kernel, modules", [("flash", "flash_attn_interface, flash_attn"), ("sage", "sageattention")])
def test_a_kernel_whose_library_is_missing_is_refused_when_configured(kernel, modules):
    if any(importlib.util.find_spec(m) for m in modules.split(", ")):
        pytest.skip(f"{modules} is installed here")
    with pytest.raises(ValidationError) as err:
        PipelineConfig(attention=kernel)
    message = str(err.value)
    assert f"attention={kernel!r} needs one of {modules}, and none is installed here" in message
    assert "allowed: sdpa, flash, sage" in message


def test_an_unknown_kernel_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValidationError, match="attention\n  Input should be 'sdpa', 'flash' or 'sage'"):
        PipelineConfig(attention="xformers")


def test_on_a_cpu_only_sdpa_runs(tiny_checkpoint, tmp_path, monkeypatch):
    """With a FlashAttention 3 module importable (a stand-in file here: nothing of it runs), the configuration
    is accepted, and loading it for a CPU is refused before any weights load."""
    (tmp_path / "flash_attn_interface.py").write_text("def flash_attn_func(q, k, v):\n    raise AssertionError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = PipelineConfig(attention="flash", device="cpu")
    with pytest.raises(ValueError, match="attention='flash' runs on CUDA only; on cpu only attention='sdpa' runs"):
        load_runner("tiny", tiny_checkpoint.parent, config)


def test_the_swapped_in_processor_computes_mochis_attention(tiny_checkpoint):
    """The processor that carries the flash and sage kernels (and sequence parallelism), here with SDPA as its
    kernel in one process, gives diffusers' own processor's video (CFG batch, a prompt and an empty one)."""
    params = GenerationParams.parse("a cat surfing a wave", **TINY_JOB)
    runner = load_runner("tiny", tiny_checkpoint.parent)
    ours = load_runner("tiny", tiny_checkpoint.parent)
    for block in ours.pipe.transformer.transformer_blocks:
        block.attn1.processor = GangAttention(attention_kernel("sdpa"))
    a, b = runner.generate(params), ours.generate(params)
    assert (a.latents - b.latents).abs().max().item() <= 1e-6
    assert not torch.equal(a.latents, torch.zeros_like(a.latents))
