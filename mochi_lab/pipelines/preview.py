"""Live previews: what the video is becoming, from the latents, without the VAE.

At a preview step the clean latent x0 is extrapolated from the last two latents along the sampler's
own velocity (flow matching: x moves linearly in sigma, so x0 is where the current step's line reaches
the schedule's last sigma). A linear map, fitted by least squares on this pipeline's own VAE (random
latents decoded once, at the first preview), turns the 12 latent channels into RGB. The result is one
small picture per latent frame, at the latent's resolution (1/8 of the video's), kept as an animated
WebP of at most PREVIEW_BYTES.

Nothing here knows of Ray or Redis.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

PREVIEW_BYTES = 64 * 1024
_FIT_SHAPE = (2, 8, 8)  # latent frames, height, width of each fitting sample: 7 frames of 64x64 decoded

# on_preview(step, frames): frames (latent frames, h, w, 3) uint8
PreviewCallback = Callable[[int, np.ndarray], None]


@dataclass
class PreviewPlan:
    """When to preview: every `every` steps (0: about every 10 % of them), at most once per
    `min_interval_s`; the last denoising step is always offered."""

    emit: PreviewCallback
    every: int = 0
    min_interval_s: float = 1.0
    _last: float = field(default=float("-inf"), repr=False)

    def due(self, step: int, total: int) -> bool:
        every = self.every or max(1, round(total / 10))
        if step % every and step != total:
            return False
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return False
        self._last = now
        return True


@dataclass
class PreviewMap:
    """RGB in [0, 1] = latents (normalised, as the sampler sees them) @ weight + bias."""

    weight: torch.Tensor  # (channels, 3)
    bias: torch.Tensor  # (3,)
    r2: float  # on held-out decoded samples: the share of the RGB variance the map explains

    def frames(self, x0: torch.Tensor) -> np.ndarray:
        """(1, C, T, h, w) latents -> (T, h, w, 3) uint8."""
        rgb = torch.einsum("ncthw,ck->nthwk", x0.float(), self.weight.to(x0.device)) + self.bias.to(x0.device)
        return (rgb[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> video in [0, 1], (N, 3, frames, H, W): the pipeline's own last stage."""
    cfg = pipe.vae.config
    channels = latents.shape[1]
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, channels, 1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, channels, 1, 1, 1).to(latents)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    video = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1)


def _pool_to_latent_grid(video: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """(1, 3, F, H, W) -> (latent_frames, h, w, 3): each latent frame's pixels averaged (frame 0 alone,
    then groups of the VAE's temporal factor), and 8x8 blocks averaged."""
    _, _, frames, height, width = video.shape
    factor = (frames - 1) // max(latent_frames - 1, 1) if latent_frames > 1 else 1
    groups = [video[:, :, :1]] + [video[:, :, 1 + factor * (t - 1):1 + factor * t] for t in range(1, latent_frames)]
    pooled = torch.cat([g.mean(dim=2, keepdim=True) for g in groups], dim=2)
    pooled = torch.nn.functional.avg_pool3d(pooled, (1, 8, 8)) if height >= 8 and width >= 8 else pooled
    return pooled[0].permute(1, 2, 3, 0)


@torch.inference_mode()
def fit_preview_map(pipe, samples: int = 6, seed: int = 0) -> PreviewMap:
    """Least squares of decoded RGB on latent channels, over random latents decoded by this pipeline's
    VAE; a sixth of the samples are held out to measure the fit (r2)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    channels = pipe.transformer.config.in_channels
    xs, ys = [], []
    for _ in range(samples):
        lat = torch.randn((1, channels, *_FIT_SHAPE), generator=gen).to(pipe.vae.device)
        rgb = _pool_to_latent_grid(decode_latents(pipe, lat), _FIT_SHAPE[0])
        xs.append(lat[0].permute(1, 2, 3, 0).reshape(-1, channels).float().cpu())
        ys.append(rgb.reshape(-1, 3).float().cpu())
    held = max(1, samples // 6)
    x, y = torch.cat(xs[:-held]), torch.cat(ys[:-held])
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    weight, bias = solution[:-1], solution[-1]
    xt, yt = torch.cat(xs[-held:]), torch.cat(ys[-held:])
    residual = ((xt @ weight + bias - yt) ** 2).sum()
    total = ((yt - yt.mean(dim=0)) ** 2).sum().clamp_min(1e-12)
    return PreviewMap(weight=weight, bias=bias, r2=float(1 - residual / total))


def estimate_x0(before: torch.Tensor, after: torch.Tensor, sigma_before: float, sigma_after: float,
                sigma_end: float) -> torch.Tensor:
    """The clean latent the current step points at: its line through (sigma, latents) at sigma_end."""
    if sigma_after == sigma_before:
        return after
    velocity = (after - before) / (sigma_after - sigma_before)
    return after + (sigma_end - sigma_after) * velocity


def encode_strip(frames: np.ndarray, fps: float = 4.0, max_bytes: int = PREVIEW_BYTES) -> bytes:
    """(T, h, w, 3) uint8 -> an animated WebP of at most `max_bytes` (lower quality, then fewer frames)."""
    images = [Image.fromarray(f) for f in frames]
    for quality in (80, 60, 40, 20):
        for keep in range(len(images), 0, -max(1, len(images) // 4)):
            picked = images[:: max(1, round(len(images) / keep))]
            buf = io.BytesIO()
            picked[0].save(buf, format="WEBP", save_all=True, append_images=picked[1:], quality=quality,
                           duration=int(1000 / fps), loop=0)
            if buf.tell() <= max_bytes:
                return buf.getvalue()
    raise ValueError(f"a {frames.shape} preview does not fit in {max_bytes} bytes")


__all__ = ["PREVIEW_BYTES", "PreviewCallback", "PreviewMap", "PreviewPlan", "decode_latents", "encode_strip",
           "estimate_x0", "fit_preview_map"]
