"""Load a Mochi checkpoint with diffusers and turn `GenerationParams` into frames.

The real model and the tiny one go through the same `MochiPipeline.from_pretrained` path.
Nothing here knows of Ray or Redis: progress leaves through the `on_step` callback, previews through
a `PreviewPlan`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers import MochiPipeline

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines.cfg_parallel import CfgParallel
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pipelines.preview import PreviewMap, PreviewPlan, estimate_x0, fit_preview_map

log = logging.getLogger(__name__)

# on_step(step, total) -> None; raise from it (e.g. JobCancelled) to stop within one step
StepCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    frames: np.ndarray  # (num_frames, height, width, 3) uint8
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # the last step's latents, before the VAE


class MochiRunner:
    """One loaded pipeline; `generate` is called once per job and never reloads weights."""

    def __init__(self, source: str, config: PipelineConfig | None = None, *, name: str | None = None,
                 pipe: MochiPipeline | None = None):
        """Load `source` with `from_pretrained`, or adopt an already built `pipe` (the benchmark's
        random full-size Mochi), then apply the config's options."""
        self.config = config or PipelineConfig()
        self.source = source
        self.name = name or source
        self.parallel: CfgParallel | None = None
        t0 = time.perf_counter()
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = self.config.torch_dtype(self.device)
        if pipe is None:
            kwargs: dict[str, Any] = {"dtype": self.dtype}
            if self.config.variant:
                kwargs["variant"] = self.config.variant
            pipe = MochiPipeline.from_pretrained(source, **kwargs)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        if self.config.vae_tiling:
            self.pipe.vae.enable_tiling()
        else:  # an adopted pipe may come tiled
            self.pipe.vae.disable_tiling()
        if self.config.cpu_offload and self.device.type == "cuda":
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(self.device)
        self.step_cache: dict[str, int] | None = None
        if self.config.step_cache_threshold is not None:
            self.step_cache = enable_first_block_cache(self.pipe.transformer, self.config.step_cache_threshold)
        if self.config.compile:
            compile_blocks(self.pipe.transformer)
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s on %s in %.1fs", self.name, self.device, self.load_s)

    def enable_cfg_parallel(self, parallel: CfgParallel) -> None:
        """Split each guided step's transformer batch over `parallel`'s two ranks (see cfg_parallel)."""
        parallel.wrap(self.pipe.transformer)
        self.parallel = parallel

    def count_tokens(self, text: str) -> int:
        return len(self.pipe.tokenizer(text).input_ids)

    @property
    def preview_map(self) -> PreviewMap:
        """Latent -> RGB for previews, fitted on this pipeline's VAE at first use."""
        if getattr(self, "_preview_map", None) is None:
            t0 = time.perf_counter()
            self._preview_map = fit_preview_map(self.pipe)
            log.info("fitted the preview map of %s in %.2fs (held-out r2 %.3f)", self.name,
                     time.perf_counter() - t0, self._preview_map.r2)
        return self._preview_map

    @torch.inference_mode()
    def generate(self, params: GenerationParams, on_step: StepCallback | None = None,
                 preview: PreviewPlan | None = None, decode: bool = True) -> GenerationResult:
        """Text encode, denoise (reporting each step, previewing as `preview` plans), then VAE decode;
        returns uint8 frames. With CFG parallelism both ranks call this for a guided job; rank 1 passes
        `decode=False` (its frames are empty) and no preview."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        cfg = params.guidance_scale > 1.0
        if self.step_cache is not None:
            # a job stopped mid-way leaves the hooks' residuals behind: the next job must not compare with them
            self.pipe.transformer._reset_stateful_cache()
            self.step_cache.update(calls=0, skips=0)
        if self.parallel is not None:
            self.parallel.active = cfg
        embeds, mask, neg_embeds, neg_mask = self.pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            do_classifier_free_guidance=cfg,
            device=self.device,
        )
        t1 = time.perf_counter()
        timings["text_s"] = t1 - t0
        marks = {"last_step": t1}
        total = params.num_inference_steps
        seen: dict[str, torch.Tensor] = {}
        if preview is not None:
            self.preview_map  # fitted before the first step, not inside one

        def this_step(step: int, total: int) -> None:
            latents_now = seen["now"]
            # bad weights or a bf16 overflow give NaN latents; fail now rather than decode garbage
            if not torch.isfinite(latents_now).all():
                raise FloatingPointError(f"non-finite latents at step {step}/{total}: check the weights and dtype")
            if preview is not None and preview.due(step, total):
                sigmas = self.pipe.scheduler.sigmas
                x0 = estimate_x0(seen["latents"], latents_now, float(sigmas[step - 1]), float(sigmas[step]),
                                 float(sigmas[-1]))
                preview.emit(step, self.preview_map.frames(x0))
            seen["latents"] = latents_now  # the sampler makes a new tensor each step: a reference, no copy
            if on_step is not None:
                on_step(step, total)

        # With CFG parallelism the whole step's work is synced, the preview included (rank 0 only): an error
        # anywhere in it stops both ranks at this step instead of leaving the other in the next all-gather.
        step_fn = self.parallel.synced_step(this_step) if self.parallel is not None and cfg else this_step

        def callback(pipe, i, t, kwargs):
            marks["last_step"] = time.perf_counter()
            seen["now"] = kwargs["latents"]
            step_fn(i + 1, total)
            return kwargs

        # Latents are drawn on the CPU so a seed gives the same video on every device.
        latents = self.pipe.prepare_latents(
            1, self.pipe.transformer.config.in_channels, params.height, params.width, params.num_frames,
            torch.float32, torch.device("cpu"), generator,
        ).to(self.device, embeds.dtype)
        seen["latents"] = latents
        out = self.pipe(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt_embeds=neg_embeds,
            negative_prompt_attention_mask=neg_mask,
            height=params.height,
            width=params.width,
            num_frames=params.num_frames,
            num_inference_steps=total,
            guidance_scale=params.guidance_scale,
            latents=latents,
            output_type="np" if decode else "latent",
            callback_on_step_end=callback,
        )
        t2 = time.perf_counter()
        timings["denoise_s"] = marks["last_step"] - t1
        info = self.memory_info()
        if self.step_cache is not None:
            info.update(step_cache_calls=self.step_cache["calls"], step_cache_skips=self.step_cache["skips"])
        if not decode:
            frames = np.zeros((0, params.height, params.width, 3), np.uint8)
        else:
            timings["decode_s"] = t2 - marks["last_step"]
            frames = (np.clip(out.frames[0], 0.0, 1.0) * 255).round().astype(np.uint8)
        return GenerationResult(frames=frames, timings=timings, info=info, latents=seen["latents"])

    def memory_info(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            return {}
        return {
            "gpu_peak_bytes": torch.cuda.max_memory_allocated(self.device),
            "gpu_allocated_bytes": torch.cuda.memory_allocated(self.device),
        }

    def reset_peak(self) -> None:
        # No gc.collect() or empty_cache() here: with diffusers loaded a full collection costs ~0.2 s
        # a job, and the caching allocator's reserve is reused, not leaked (allocated bytes are measured).
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Regional torch.compile: each transformer block, which all share one graph, so compiling costs
    about one block rather than 48, and the forward around them (the CFG split, the cache hooks'
    decisions) stays eager. Mochi's attention calls torch.nonzero on the text mask; capturing it as a
    dynamic shape keeps each block one graph instead of breaking it."""
    import torch._dynamo as dynamo

    dynamo.config.capture_dynamic_output_shape_ops = True
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    for block in transformer.transformer_blocks:
        block.compile()


def enable_first_block_cache(transformer: torch.nn.Module, threshold: float) -> dict[str, int]:
    """diffusers' First Block Cache on `transformer`; returns live counts of its transformer calls and of
    those it skipped (all blocks after the first), which the hooks do not expose themselves."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    hook = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    decide = hook._should_compute_remaining_blocks
    counts = {"calls": 0, "skips": 0}

    @torch.compiler.disable  # counting is Python bookkeeping; a compiled block calls it eagerly
    def counted(residual: torch.Tensor) -> bool:
        compute = decide(residual)
        counts["calls"] += 1
        counts["skips"] += not compute
        return compute

    hook._should_compute_remaining_blocks = counted
    return counts
