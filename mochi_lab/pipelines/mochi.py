"""Load a Mochi checkpoint with diffusers and turn `GenerationParams` into frames.

The real model and the tiny one go through the same `MochiPipeline.from_pretrained` path.
Nothing here knows of Ray or Redis: progress leaves through the `on_step` callback, previews through
a `PreviewPlan`'s. Several ranks run one video through a `Parallel` plan (see cfg_parallel).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from diffusers import MochiPipeline

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines.attention import set_attention
from mochi_lab.pipelines.cfg_parallel import Layout, Parallel, visual_tokens
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pipelines.lora import LoraCache
from mochi_lab.pipelines.preview import PreviewMap, PreviewPlan, decode_latents, estimate_x0, fit_preview_map

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
        self.parallel: Parallel | None = None
        t0 = time.perf_counter()
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.config.attention != "sdpa" and self.device.type != "cuda":
            raise ValueError(f"attention={self.config.attention!r} runs on CUDA only; on {self.device.type} only "
                             f"attention='sdpa' runs")
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
        if self.config.attention != "sdpa":
            set_attention(self.pipe.transformer, self.config.attention, None)
        self.step_cache: dict[str, int] | None = None
        if self.config.step_cache_threshold is not None:
            self.step_cache = enable_first_block_cache(self.pipe.transformer, self.config.step_cache_threshold,
                                                       lambda: self.parallel if self.parallel and self.parallel.job
                                                       else None)
        if self.config.compile:
            compile_blocks(self.pipe.transformer)
        self.lora = LoraCache(self.pipe)  # LoRA adapters loaded into this pipeline, per job (the worker's size)
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s on %s in %.1fs", self.name, self.device, self.load_s)

    def enable_parallel(self, parallel: Parallel) -> None:
        """Run each job over `parallel`'s ranks, in the layout `generate` is given or the plan's policy picks
        (see cfg_parallel). Every rank calls `generate` with the same params, layout and `decode`."""
        parallel.wrap(self.pipe.transformer, self.config.attention)
        self.parallel = parallel

    enable_cfg_parallel = enable_parallel  # its name when the only plan was the CFG pair (CfgParallel)

    @property
    def split_decode(self) -> bool:
        return self.parallel is not None and self.parallel.split_decode and self.config.parallel_decode

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
                 preview: PreviewPlan | None = None, decode: bool = True, layout: Layout | None = None,
                 ) -> GenerationResult:
        """Text encode, denoise (reporting each step, previewing as `preview` plans), then VAE decode;
        returns uint8 frames. With a parallel plan every rank calls this for the job, in `layout` (None: the
        plan's policy; a LayoutError before any work if the job cannot run in it). Rank 0 alone previews and
        gets frames; with a split decode every rank decodes its share, otherwise the other ranks pass
        `decode=False`. `info` records the layout."""
        plan = self.parallel
        if plan is None:
            return self._generate(params, on_step, preview, decode, None)
        transformer = self.pipe.transformer
        layout = plan.begin(params.guidance_scale > 1.0,
                            visual_tokens(transformer.config, params.num_frames, params.height, params.width),
                            transformer.config.num_attention_heads, layout)
        try:
            return self._generate(params, on_step, preview, decode, layout)
        finally:
            plan.end()

    def _generate(self, params: GenerationParams, on_step: StepCallback | None, preview: PreviewPlan | None,
                  decode: bool, layout: Layout | None) -> GenerationResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        cfg = params.guidance_scale > 1.0
        if self.step_cache is not None:
            # a job stopped mid-way leaves the hooks' residuals behind: the next job must not compare with them
            self.pipe.transformer._reset_stateful_cache()
            self.step_cache.update(calls=0, skips=0)
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

        # In a gang the whole step's work is synced, the preview included (rank 0 only): an error anywhere in
        # it stops every rank at this step instead of leaving the others in the next collective.
        step_fn = self.parallel.synced_step(this_step) if layout is not None else this_step

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
            output_type="latent",
            callback_on_step_end=callback,
        )
        timings["denoise_s"] = marks["last_step"] - t1
        info = self.memory_info()
        if self.step_cache is not None:
            info.update(step_cache_calls=self.step_cache["calls"], step_cache_skips=self.step_cache["skips"])
        if layout is not None:
            info.update(layout=layout.name, cfg_degree=layout.cfg, sp_degree=layout.sp, ranks=layout.world)
        frames = np.zeros((0, params.height, params.width, 3), np.uint8)
        if decode:
            t2 = time.perf_counter()
            decoded, memory = self.decode(out.frames, split=layout is not None and self.split_decode)
            timings["decode_s"] = time.perf_counter() - t2
            info.update(memory)
            if decoded is not None:
                frames = decoded
        return GenerationResult(frames=frames, timings=timings, info=info, latents=seen["latents"])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, split: bool = False) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The VAE decode of the sampler's latents to uint8 frames (T, H, W, 3), and its memory: with `split`,
        over the plan's ranks (every rank calls it; rank 0 gets the frames, the others None). The memory
        figure is this rank's peak during the decode above what it held at its start: CUDA allocations on a
        GPU, resident memory (VmHWM, reset at the start) on a CPU."""
        with _peak_memory(self.device) as memory:
            if split:
                video = self.parallel.decode(self.pipe, latents)
                memory["decode_ranks"] = self.parallel.decode_ranks
            else:
                video = decode_latents(self.pipe, latents)
        if video is None:
            return None, memory
        frames = (video[0].permute(1, 2, 3, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
        return frames, memory

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


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that, after the block, holds `decode_peak_bytes` (None where it cannot be read) and what
    it measured. On CUDA the job's own peak (memory_info's gpu_peak_bytes) is kept across the reset here."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        job_peak, start = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(decode_peak_bytes=peak - start, decode_peak_measure="CUDA allocated, above the decode's start",
                   gpu_peak_bytes=max(job_peak, peak))
        return
    start = _resident("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak (VmHWM) restarts from the current RSS
            f.write("5")
        reset = start is not None
    except OSError:
        reset = False
    yield out
    peak = _resident("VmHWM") if reset else None
    out.update(decode_peak_bytes=None if peak is None else peak - start,
               decode_peak_measure="resident memory (VmHWM), above the decode's start")


def _resident(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


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


def enable_first_block_cache(transformer: torch.nn.Module, threshold: float,
                             gang: Callable[[], Parallel | None] = lambda: None) -> dict[str, int]:
    """diffusers' First Block Cache on `transformer`, deciding with the same statistic as diffusers (the mean
    absolute change of the first block's residual since the last full call, relative to that residual's mean
    absolute value) but in float32 and, while `gang()` gives a plan running a job, over every rank's share of
    the batch and sequence, so that all ranks skip or compute together. Returns live counts of its transformer
    calls and of those it skipped (all blocks after the first), which the hooks do not expose themselves."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    hook = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    counts = {"calls": 0, "skips": 0}

    @torch.compiler.disable  # a decision and its counting are Python bookkeeping; a compiled block calls it eagerly
    def decide(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        plan = gang()
        if plan is not None:
            compute = plan.agree_to_compute(residual, previous, hook.threshold)
        elif previous is None:
            compute = True
        else:
            before = previous.float().abs().sum()
            compute = bool(before == 0 or (residual.float() - previous.float()).abs().sum() / before > hook.threshold)
        counts["calls"] += 1
        counts["skips"] += not compute
        return compute

    hook._should_compute_remaining_blocks = decide
    return counts
