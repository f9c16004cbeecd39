"""Pipeline options for the real model: each a documented switch, defaults chosen by measurement."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    # None: no hooks; 0: hooks that never skip (the same frames as None).
    step_cache_threshold: float | None = Field(default=None, ge=0.0)

    def torch_dtype(self, device):
        import torch

        return torch.bfloat16 if self.bf16 and device.type == "cuda" else torch.float32
