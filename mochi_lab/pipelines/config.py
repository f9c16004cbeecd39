"""Pipeline options for the real model: each a documented switch, defaults chosen by measurement."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, Field, field_validator

# The attention kernels `PipelineConfig.attention` may name, and the modules each needs (the first found is used).
ATTENTION_LIBRARIES: dict[str, tuple[str, ...]] = {
    "sdpa": (),  # torch's scaled_dot_product_attention
    "flash": ("flash_attn_interface", "flash_attn"),  # FlashAttention 3 (Hopper build), else FlashAttention 2
    "sage": ("sageattention",),  # SageAttention
}


def attention_module(name: str) -> str | None:
    """The installed module that provides attention kernel `name` (None for sdpa, which torch provides)."""
    for module in ATTENTION_LIBRARIES[name]:
        if importlib.util.find_spec(module) is not None:  # found, not imported: configuring stays cheap
            return module
    if ATTENTION_LIBRARIES[name]:
        raise ValueError(f"attention={name!r} needs one of {', '.join(ATTENTION_LIBRARIES[name])}, and none is "
                         f"installed here; install it, or use attention='sdpa' (allowed: "
                         f"{', '.join(ATTENTION_LIBRARIES)})")
    return None


class PipelineConfig(BaseModel):
    """How a worker loads and runs Mochi. Defaults suit one 80 GB GPU; the CPU ignores GPU-only switches."""

    device: str | None = None  # None: cuda when available, else cpu
    # bf16 weights on CUDA (diffusers' variant="bf16" files for genmo/mochi-1-preview); fp32 on CPU
    bf16: bool = True
    variant: str | None = None
    # tiled VAE decode: without it an 85-frame 848x480 decode needs far more memory than the transformer
    vae_tiling: bool = True
    # model CPU offload: for GPUs under ~48 GB; costs PCIe transfers every job
    cpu_offload: bool = False
    # regional torch.compile of the transformer's blocks: a slow first job, faster steps after
    compile: bool = False
    # First Block Cache (diffusers' cache hooks): a transformer call whose first block's residual changed by
    # less than this (relative mean) since the last full call reuses the other blocks' cached residual.
    # None: no hooks; 0: hooks that never skip (the same frames as None). In a gang every rank takes the same
    # decision, from the residual of the whole batch and sequence (see cfg_parallel).
    step_cache_threshold: float | None = Field(default=None, ge=0.0)
    # The attention kernel: "sdpa" (torch; the only one on CPU), "flash" (FlashAttention 3 when installed, else 2)
    # or "sage" (SageAttention). A kernel whose library is not installed is refused here, when configured.
    attention: Literal["sdpa", "flash", "sage"] = "sdpa"
    # In a gang of several ranks: the VAE decode split over the ranks by latent frames (each rank decodes its
    # frames with the causal context it needs, rank 0 gathers them). False: rank 0 decodes alone.
    parallel_decode: bool = True

    @field_validator("attention")
    @classmethod
    def _installed(cls, v: str) -> str:
        attention_module(v)
        return v

    def torch_dtype(self, device):
        import torch

        return torch.bfloat16 if self.bf16 and device.type == "cuda" else torch.float32
