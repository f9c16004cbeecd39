"""Mochi 1 through mochi_lab's own runner, full size with random weights: what each option buys per video.

Builds the full-size Mochi in bf16 on the GPU from configs alone (no hub access; timing does not depend on
the weights): diffusers' `MochiTransformer3DModel()` (48 layers, width 3072, = mochi-1-preview),
`AutoencoderKLMochi()` and a T5-XXL-shaped `T5EncoderModel` (24 layers, d_model 4096), wrapped in a
`MochiPipeline` and handed to `mochi_lab.pipelines.mochi.MochiRunner`. Each option is a `PipelineConfig` and a
real `runner.generate()` call at 848x480 with CFG (guidance 4.5):

  baseline            PipelineConfig() (VAE tiling on): 85 frames (and 163 if the budget allows)
  vae_untiled         vae_tiling=False: decode time and peak memory (an OOM is recorded)
  first_block_cache   step_cache_threshold: skipped calls counted; with random weights the ratio is indicative only
  cfg_parallel        2 ranks (NCCL, 2 GPUs; gloo, 2 CPU processes in smoke): the CFG batch split, as gpus_per_worker=2
  compile             compile=True (regional torch.compile of the blocks); the first job's extra time is compile time
  product (--all)     the product path: the model saved as a checkpoint, then one job through mochi_lab's own
                      worker loop (`Worker` over a SQLite store, submitted with `MochiCluster(backend=DirectBackend(
                      settings, store, pool=None))`), its MP4 decoded, `job.timings` and the worker row's NVML figures

The product path runs the `Worker` in a thread of this process, not in a Ray pool: the device machines have no
Ray, and Ray's wheel (79 MB for cp312) is over the 64 MiB that may travel with the tree. Everything else a pool
worker does (claim, heartbeat, progress, previews, MP4 and thumbnail, completion, its row) is the same code.

Per run: per-step time (median of the steps after the first), MFU, text encode, decode, peak memory, and the
projected time of 85 and 163 frames at 64 steps (text + 64 steps + decode). FLOP model:
    FLOP/pass = 2*L*(4*d^2 + 3*d*f) * V  +  4*N^2*d*L        (linear layers + attention QK^T and PV)
V = T_lat*(H/16)*(W/16), T_lat = (frames-1)//6 + 1, N = V + valid text tokens; FLOP/step = 2 * FLOP/pass (CFG).
MFU = achieved FLOP/s / (989 TFLOPS x GPUs) (H100 and H200: 989 TFLOPS dense bf16). With one GPU the 2-GPU
CFG gang is projected, not measured: each rank runs one half of the CFG batch, so its step is the baseline
step / 2 plus the all-gather of the noise prediction (modelled at the link bandwidth `--link-gbps`).

Usage: python benchmarks/gpu_mochi.py OUT_DIR [--smoke] [--all]. Without CUDA it runs a tiny float32 smoke config
through the same code paths and writes the same JSON (OUT_DIR/gpu_mochi.json); its timings mean nothing,
except the CFG-parallel/baseline step ratio of the tiny model on this CPU. A real GPU run also writes
<results-dir>/<date>-<gpu>.json. benchmarks/gpu_standing_order.sh is the one-call GPU run (issue 27).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mochi_lab.params import GenerationParams  # noqa: E402
from mochi_lab.pipelines.cfg_parallel import Layout  # noqa: E402
from mochi_lab.pipelines.config import PipelineConfig  # noqa: E402

PEAK_TFLOPS = 989.0
STEPS = 64
GUIDANCE = 4.5
FORMULA = ("FLOP/pass = 2*L*(4d^2+3df)*V + 4*N^2*d*L  [full size: 10.87 GFLOP*V + 4*N^2*3072*48], "
           "V = T_lat*(H/16)*(W/16), N = V + valid text tokens, FLOP/step = 2*FLOP/pass (CFG batch 2), "
           f"MFU vs {PEAK_TFLOPS:.0f} TFLOPS bf16 per GPU")
ANCHORS = {"mochi_xdit_cfg_parallel_2gpu_speedup": 1.99, "paraattention_a100_84f_1gpu_s": 196,
           "paraattention_a100_84f_2gpu_cfg_s": 105, "paraattention_a100_84f_2gpu_cfg_compile_s": 82,
           "flop_floor_85f_64steps_1xh100_s": 78, "flop_floor_85f_64steps_2xh100_s": 39}
# Issue 27's goals: 85 frames at 848x480, 64 steps, on a 2-GPU CFG gang without caching, at most 50 s as
# projected here; at least 45 % MFU in denoising; no OOM with the default options on an 80 GB card.
GOALS = {"denoise_mfu_min": 0.45, "cfg_parallel_85f_64steps_max_s": 50.0,
         # issue 28's: 163 frames at 64 steps in at most 60 s on 8 H100s (CFG 2 x SP 4)
         "gang8_163f_64steps_max_s": 60.0}
GANG_SIZES = (2, 4, 8)
# The product path's checkpoint is registered under this name (MOCHI_LAB_MODELS), as a user's own model is.
PRODUCT_MODEL = "random-full-size"
# The rows run with the default PipelineConfig: an OOM in any of them fails the "no OOM" goal.
DEFAULT_OPTIONS = {"baseline", "cfg_parallel", "product"}
# A long prompt: the pipeline pads and truncates to 256 T5 tokens, and only valid tokens are attended. The product
# job's is a user's prompt: the worker refuses one over 256 tokens.
PRODUCT_PROMPT = "a slow motion close up of a red cat surfing a blue ocean wave at sunset, cinematic"
PROMPT = " ".join(["a slow motion close up of a red cat surfing a blue ocean wave at sunset, cinematic"] * 16)
# 8 heads: sequence parallelism of 2, 4 and 8 divides them (the full model's 24 heads take the same degrees)
TINY_TRANSFORMER = dict(num_layers=2, num_attention_heads=8, attention_head_dim=4, pooled_projection_dim=16,
                        in_channels=12, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
                        activation_fn="swiglu", max_sequence_length=256)
TINY_VAE = dict(latent_channels=12, encoder_block_out_channels=(32, 32, 32, 32),
                decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              decoder_start_token_id=0)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               decoder_start_token_id=0)


def build_pipe(smoke: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The full-size (or smoke) Mochi with random weights, built in place on `device` in `dtype`. The VAE keeps
    its encoder (0.1 B parameters): a saved copy must load with `from_pretrained`, as the product path does."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from mochi_lab.pipelines.tiny import MOCHI_1_SCHEDULER_CONFIG, _tokenizer

    tokenizer = _tokenizer()  # any T5 tokenizer: only token counts matter for timing
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 10B-parameter fp32 init on the CPU would take minutes
    try:
        with torch.device(device), torch.no_grad():
            transformer = MochiTransformer3DModel(**(TINY_TRANSFORMER if smoke else {})).to(dtype).eval()
            # random weights: a small output layer keeps 64 steps of latents finite; the cost is unchanged
            transformer.proj_out.weight.mul_(0.01)
            vae = AutoencoderKLMochi(**(TINY_VAE if smoke else {})).to(dtype).eval()
            text_encoder = T5EncoderModel(T5Config(vocab_size=max(len(tokenizer), 32128),
                                                   **(TINY_T5 if smoke else T5_XXL))).to(dtype).eval()
    finally:
        torch.set_default_dtype(old)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**MOCHI_1_SCHEDULER_CONFIG), vae=vae,
                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def make_runner(pipe, config: PipelineConfig, device: torch.device):
    from mochi_lab.pipelines.mochi import MochiRunner

    return MochiRunner("random-full-size", config.model_copy(update={"device": str(device)}), name="random", pipe=pipe)


class Bench:
    """Sizes, deadline and the JSON being built (rewritten after every section)."""

    def __init__(self, out_dir: Path, smoke: bool, budget_s: float, reserve_s: float = 0.0) -> None:
        self.out, self.smoke = out_dir, smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        # the benchmark's sections end `reserve_s` early: that time is the product path's (release_reserve)
        self.t0, self.deadline = time.monotonic(), time.monotonic() + budget_s - reserve_s
        self.reserve_s = reserve_s
        self.h, self.w = (480, 848) if not smoke else (32, 48)
        self.frames = (85, 163) if not smoke else (7, 13)
        self.decode_frames = 163 if not smoke else 31  # the split decode's length (smoke: 6 latent frames)
        self.steps = 4 if not smoke else 10  # the first step is not timed
        self.res: dict[str, Any] = {"gpu_name": None, "meta": {}, "runs": [], "decode": [], "projection": {},
                                    "goals": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def release_reserve(self) -> None:
        self.deadline, self.reserve_s = self.deadline + self.reserve_s, 0.0

    def save(self) -> None:
        self.res["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        (self.out / "gpu_mochi.json").write_text(json.dumps(self.res, indent=2, default=str))


def flops(tr_config: Any, frames: int, h: int, w: int, text_tokens: int, ff: int) -> dict[str, float]:
    d, L = tr_config.num_attention_heads * tr_config.attention_head_dim, tr_config.num_layers
    t_lat = (frames - 1) // 6 + 1
    v = t_lat * (h // 16) * (w // 16)
    n = v + text_tokens
    linear, attn = 2 * L * (4 * d * d + 3 * d * ff) * v, 4 * n * n * d * L
    return {"visual_tokens": v, "tokens": n, "step_tflop": 2 * (linear + attn) / 1e12, "attn_tflop": 2 * attn / 1e12}


def params(b: Bench, frames: int, steps: int) -> GenerationParams:
    return GenerationParams.parse(PROMPT, seed=0, num_frames=frames, height=b.h, width=b.w,
                                  num_inference_steps=steps, guidance_scale=GUIDANCE)


def timed_job(b: Bench, runner, frames: int, steps: int, option: str, gpus: int = 1, decode: bool = True,
              layout: Layout | None = None) -> dict[str, Any]:
    """One real `runner.generate` call; step times come from the step callback (the runner's finiteness
    check reads the latents each step, so on CUDA each mark follows a synchronisation)."""
    marks: list[float] = []
    if b.cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = runner.generate(params(b, frames, steps), lambda i, n: marks.append(time.perf_counter()), decode=decode,
                             layout=layout)
    wall = time.perf_counter() - t
    text_tokens = int(runner.pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, device=runner.device)[1]
                      .sum()) if "text_tokens" not in b.res["meta"] else b.res["meta"]["text_tokens"]
    b.res["meta"]["text_tokens"] = text_tokens
    steps_s = [y - x for x, y in zip(marks, marks[1:])]
    step = statistics.median(steps_s)
    fl = flops(runner.pipe.transformer.config, frames, b.h, b.w, text_tokens,
               runner.pipe.transformer.transformer_blocks[0].ff_inner_dim)
    row = {"option": option, "frames": frames, "steps": steps, "gpus": gpus, **fl, "step_s": step,
           "steps_s": steps_s, "first_step_s": marks[0] - t - result.timings["text_s"],
           "text_s": result.timings["text_s"], "decode_s": result.timings.get("decode_s") if decode else None,
           "wall_s": wall, "achieved_tflops": fl["step_tflop"] / step,
           "mfu": fl["step_tflop"] / step / (PEAK_TFLOPS * gpus),
           "peak_bytes": result.info.get("gpu_peak_bytes"), **result.info}  # the job's peak, decode included
    b.res["runs"].append(row)
    b.save()
    return row


def section(b: Bench, name: str, fn: Callable[[], None]) -> None:
    """Run one section; record a failure (an OOM included) instead of losing the rest of a scarce GPU run."""
    t = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        b.res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    gc.collect()  # outside the except block, whose traceback pins the failed section's tensors
    if b.cuda:
        torch.cuda.empty_cache()
    print(f"[{name}] {time.monotonic() - t:.1f}s, {b.left():.0f}s of budget left", flush=True)
    b.save()


def fits(b: Bench, row: dict[str, Any] | None, scale: float = 1.0, margin: float = 30.0) -> bool:
    """Whether a run like `row` (times `scale`) fits in what is left of the budget."""
    return row is not None and b.left() > scale * row["wall_s"] + margin


def bench_baseline(b: Bench, pipe) -> None:
    runner = make_runner(pipe, PipelineConfig(), b.dev)
    timed_job(b, runner, b.frames[0], 2, "warmup", decode=False)  # kernels and allocator warm-up
    b.res["runs"].pop()
    timed_job(b, runner, b.frames[0], b.steps, "baseline")


def bench_baseline_long(b: Bench, pipe, base: dict[str, Any] | None) -> None:
    """The baseline at the long length, 3 steps, if a run of it (by the FLOP model's ratio) fits the budget."""
    if fits(b, base, 2 * flops_ratio(b, base), margin=20 if not b.smoke else 5):
        timed_job(b, make_runner(pipe, PipelineConfig(), b.dev), b.frames[1], 3, "baseline")
    else:
        b.res["runs"].append({"option": "baseline", "frames": b.frames[1], "skipped": "over budget"})


def bench_vae_untiled(b: Bench, pipe) -> None:
    runner = make_runner(pipe, PipelineConfig(vae_tiling=False), b.dev)
    try:
        timed_job(b, runner, b.frames[0], 2, "vae_untiled")
    except torch.OutOfMemoryError as e:  # the known pitfall: record it
        b.res["runs"].append({"option": "vae_untiled", "frames": b.frames[0], "oom": str(e).splitlines()[0]})
    finally:
        pipe.vae.enable_tiling()


def bench_cache(b: Bench, pipe, threshold: float) -> None:
    """First Block Cache at `threshold`, and with a huge threshold (every call after the first skips): the
    cost of a hit. Random weights make the real skip ratio unknowable; the projection takes both costs."""
    for option, th in (("first_block_cache", threshold), ("first_block_cache_all_hits", 1e9)):
        try:
            timed_job(b, make_runner(pipe, PipelineConfig(step_cache_threshold=th), b.dev), b.frames[0],
                      b.steps + 2, option, decode=False)  # the decode is the baseline's
        finally:
            pipe.transformer.disable_cache()


def spawn_ranks(b: Bench, world: int, kind: str, plan: list[dict[str, Any]]) -> tuple[Any, list[subprocess.Popen]]:
    """The rendezvous store (this process is rank 0) and ranks 1..world-1 as child processes (GPU r / one CPU
    process each) that build the same model and run the same plan (`rank_main`)."""
    from mochi_lab.pipelines.cfg_parallel import rendezvous_store

    store = rendezvous_store(0, 0, timeout_s=300, world=world)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(8)))).split(",")
    children = []
    for r in range(1, world):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible[r]} if b.cuda else {**os.environ, "OMP_NUM_THREADS": "1"}
        children.append(subprocess.Popen(
            [sys.executable, __file__, str(b.out), "--rank", str(r), "--world", str(world), "--port", str(store.port),
             "--kind", kind, "--plan", json.dumps(plan), "--hw", f"{b.h}x{b.w}"] + (["--smoke"] if b.smoke else []),
            env=env))
    return store, children


def reap(children: list[subprocess.Popen]) -> None:
    for child in children:
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:  # stuck in a collective after a failure here
            child.kill()


def join(b: Bench, store: Any, rank: int, world: int, kind: str, runner: Any) -> Any:
    """Form the gang and put the runner on it: the CFG pair, CfgParallel ("cfg"), or a `Parallel` of `world`."""
    from mochi_lab.pipelines.cfg_parallel import CfgParallel, Parallel, backend_for, join_pair

    join_pair(store, rank, backend_for(b.dev), timeout_s=300, world=world)
    runner.enable_parallel(CfgParallel(b.dev) if kind == "cfg" else Parallel(b.dev, timeout_s=300))
    return runner.parallel


def bench_cfg_parallel(b: Bench, pipe, plan: list[list[int]]) -> None:
    """Rank 0 here (GPU 0 / this process), rank 1 a child process (GPU 1 / a second CPU process) that builds
    the same model and runs the same jobs: mochi_lab's own CfgParallel, the split a 2-GPU worker denoises a
    guided job with (layout cfg2xsp1)."""
    import torch.distributed as dist

    from mochi_lab.pipelines.cfg_parallel import CfgParallel

    jobs = [{"frames": f, "steps": n, "decode": False} for f, n in plan]  # rank 1 does not decode in this gang
    store, children = spawn_ranks(b, 2, "cfg", jobs)
    threads = torch.get_num_threads()
    try:
        if not b.cuda:  # the processes share the CPU's cores: one thread each, as the children
            torch.set_num_threads(1)
        runner = make_runner(pipe, PipelineConfig(), b.dev)
        join(b, store, 0, 2, "cfg", runner)
        for i, (frames, steps) in enumerate(plan):
            runner.parallel.reset_stats()
            row = timed_job(b, runner, frames, steps, "cfg_parallel", gpus=2, decode=i > 0)
            if i == 0:  # warm-up
                b.res["runs"].pop()
                continue
            calls = max(runner.parallel.stats["calls"], 1)
            row.update(gather_s_per_step=runner.parallel.stats["gather_s"] / calls,
                       sync_s_per_step=runner.parallel.stats["sync_s"] / calls)
        b.res["cfg_parallel_text"] = text_broadcast(b, runner)
        dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        CfgParallel.unwrap(pipe.transformer)  # the next sections run on one device
        reap(children)


def gang_plan(b: Bench, world: int) -> list[dict[str, Any]]:
    """A gang's jobs: a warm-up, the guided job with SP over every rank, and with CFG 2 x SP world/2."""
    f, steps = b.frames[0], (b.steps if not b.smoke else 3)
    jobs = [{"frames": f, "steps": 2, "layout": [1, world], "decode": False, "option": None},
            {"frames": f, "steps": steps, "layout": [1, world], "decode": False, "option": f"sp{world}"}]
    if world >= 4:
        jobs.append({"frames": f, "steps": steps, "layout": [2, world // 2], "decode": False,
                     "option": f"cfg2xsp{world // 2}"})
    return jobs


def decode_latents_for(b: Bench, frames: int) -> torch.Tensor:
    """A seeded random latent of `frames` frames at the run's size (the decode's cost does not depend on it)."""
    shape = (1, 12, (frames - 1) // 6 + 1, b.h // 8, b.w // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(b.dev, b.dtype)


def bench_gang(b: Bench, pipe, world: int) -> None:
    """A `Parallel` gang of `world` ranks (NCCL, one GPU each; gloo, one CPU process each in smoke): the guided
    job in SP and CFG x SP layouts, then the decode split over the gang (per-rank peak memory)."""
    import torch.distributed as dist

    from mochi_lab.pipelines.cfg_parallel import Parallel

    plan = gang_plan(b, world)
    plan.append({"decode_frames": b.decode_frames, "option": f"decode_split{world}"})
    store, children = spawn_ranks(b, world, "gang", plan)
    threads = torch.get_num_threads()
    try:
        if not b.cuda:
            torch.set_num_threads(1)
        runner = make_runner(pipe, PipelineConfig(), b.dev)
        gang = join(b, store, 0, world, "gang", runner)
        for job in plan:
            gang.reset_stats()
            if "decode_frames" in job:
                t = time.perf_counter()
                _, memory = runner.decode(decode_latents_for(b, job["decode_frames"]), split=True)
                b.res["decode"].append({"option": job["option"], "gpus": world, "frames": job["decode_frames"],
                                        "decode_s": time.perf_counter() - t, **memory,
                                        "halo_s": gang.stats["halo_s"], "gather_s": gang.stats["decode_gather_s"]})
                continue
            row = timed_job(b, runner, job["frames"], job["steps"], job["option"] or "warmup", gpus=world,
                            decode=False, layout=Layout(*job["layout"]))
            if job["option"] is None:
                b.res["runs"].pop()
                continue
            calls = max(gang.stats["calls"], 1)
            row.update({k: gang.stats[k] / calls for k in ("a2a_s", "sp_gather_s", "gather_s", "sync_s")})
        dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        Parallel.unwrap(pipe.transformer)
        reap(children)


def bench_decode_one(b: Bench, pipe) -> None:
    """The decode on this one device at the split decode's length, for comparison (per-rank peaks), unless a
    baseline run already decoded that length (its row has the decode's time and peak: decode_peak_bytes)."""
    if any(r["frames"] == b.decode_frames and r.get("decode_s") for r in b.res["runs"]):
        return
    runner = make_runner(pipe, PipelineConfig(), b.dev)
    t = time.perf_counter()
    _, memory = runner.decode(decode_latents_for(b, b.decode_frames))
    b.res["decode"].append({"option": "decode_one", "gpus": 1, "frames": b.decode_frames,
                            "decode_s": time.perf_counter() - t, **memory})


def bench_attention(b: Bench, pipe) -> None:
    """PipelineConfig(attention=...) for the kernels other than SDPA (the baseline's): where the library is
    missing the configuration refuses, and the refusal is recorded; on a CPU only SDPA runs."""
    for kernel in ("flash", "sage"):
        try:
            config = PipelineConfig(attention=kernel)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError; its first error is ours
            why = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            b.res["runs"].append({"option": f"attention_{kernel}", "frames": b.frames[0], "skipped": why[:300]})
            continue
        if not b.cuda:
            b.res["runs"].append({"option": f"attention_{kernel}", "frames": b.frames[0],
                                  "skipped": "on CPU only sdpa runs"})
            continue
        runner = make_runner(pipe, config, b.dev)
        try:
            timed_job(b, runner, b.frames[0], 2, f"attention_{kernel}_warmup", decode=False)
            b.res["runs"].pop()
            timed_job(b, runner, b.frames[0], b.steps, f"attention_{kernel}", decode=False)
        finally:
            from mochi_lab.pipelines.cfg_parallel import set_attention

            set_attention(pipe.transformer, "sdpa", None)


def text_broadcast(b: Bench, runner) -> dict[str, float]:
    """Each rank encodes the prompt (what a 2-GPU worker does), or rank 0 encodes and broadcasts the
    embeddings: the cost of both, measured, decides. Run on both ranks alike."""
    import torch.distributed as dist

    t = time.perf_counter()
    embeds, mask, neg, neg_mask = runner.pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True,
                                                            device=runner.device)
    if b.cuda:
        torch.cuda.synchronize()
    encode_s = time.perf_counter() - t
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for tensor in (embeds, mask, neg, neg_mask):
            dist.broadcast(tensor.contiguous(), src=0)
        if b.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"encode_s": encode_s, "broadcast_s": statistics.median(times),
            "embeds_bytes": 2 * embeds.numel() * embeds.element_size()}


def rank_main(a: argparse.Namespace) -> int:
    """A child of `spawn_ranks`: rank `a.rank` of a gang with the same model and plan as rank 0."""
    import torch.distributed as dist

    smoke = a.smoke or not torch.cuda.is_available()
    b = Bench(a.out_dir, smoke, 1e9)
    b.h, b.w = map(int, a.hw.split("x"))
    if smoke:
        torch.set_num_threads(1)
    from mochi_lab.pipelines.cfg_parallel import rendezvous_store

    pipe = build_pipe(smoke, b.dev, b.dtype)
    runner = make_runner(pipe, PipelineConfig(), b.dev)
    join(b, rendezvous_store(a.rank, a.port, timeout_s=300, world=a.world), a.rank, a.world, a.kind, runner)
    for job in json.loads(a.plan):
        if "decode_frames" in job:
            runner.decode(decode_latents_for(b, job["decode_frames"]), split=True)
        else:
            layout = Layout(*job["layout"]) if job.get("layout") else None
            runner.generate(params(b, job["frames"], job["steps"]), decode=job["decode"], layout=layout)
    if a.kind == "cfg":
        text_broadcast(b, runner)
    dist.destroy_process_group()
    return 0


def bench_compile(b: Bench, pipe) -> None:
    runner = make_runner(pipe, PipelineConfig(compile=True), b.dev)
    first = timed_job(b, runner, b.frames[0], 2, "compile_warmup", decode=False)
    b.res["meta"]["compile_first_job_s"] = first["wall_s"]
    b.res["runs"].pop()
    timed_job(b, runner, b.frames[0], b.steps, "compile", decode=False)


def save_checkpoint(b: Bench, pipe, work_dir: Path) -> Path:
    """The product path's model: this pipeline saved as a diffusers checkpoint (safetensors, in its dtype)."""
    path = work_dir / "checkpoint"
    t = time.perf_counter()
    pipe.save_pretrained(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    b.res["product"] = {"checkpoint_save_s": time.perf_counter() - t, "checkpoint_bytes": size}
    b.save()
    return path


def bench_product(b: Bench, checkpoint: Path, work_dir: Path, frames: int, steps: int) -> None:
    """One job through mochi_lab's own worker loop, as a pool worker runs it: the checkpoint registered as a
    model, a `Worker` (thread) over a SQLite store loading it with the default `PipelineConfig`, the job
    submitted through `MochiCluster`, its MP4 decoded. While it runs the worker's row is read every 0.5 s,
    for its NVML figures (utilisation, device memory, power), which the heartbeat refreshes."""
    from mochi_lab.client.cluster import MochiCluster
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store
    from mochi_lab.video import probe, read_frames
    from mochi_lab.worker.loop import Worker

    models = json.loads(os.environ.get("MOCHI_LAB_MODELS") or "{}")
    os.environ["MOCHI_LAB_MODELS"] = json.dumps({**models, PRODUCT_MODEL: str(checkpoint)})
    settings = Settings(data_dir=work_dir / "data", cache_dir=work_dir / "cache", account="bench", persistent=False,
                        lease_s=3.0, worker_ttl_s=30.0)  # a heartbeat (and a fresh row) every second
    store = open_store(settings.store_url, max_attempts=settings.max_attempts)
    cluster = MochiCluster(backend=DirectBackend(settings, store, pool=None, model=PRODUCT_MODEL), model=PRODUCT_MODEL)
    rec = b.res["product"]
    rec.update(model=PRODUCT_MODEL, frames=frames, steps=steps, height=b.h, width=b.w, guidance_scale=GUIDANCE)
    # queued before the worker starts, so the job's load_s is the worker's whole model load
    job = cluster.generate(PRODUCT_PROMPT, seed=0, num_frames=frames, height=b.h, width=b.w, num_inference_steps=steps,
                           guidance_scale=GUIDANCE, fps=24, force=True)
    worker = Worker("bench-worker-0", settings, PRODUCT_MODEL, PipelineConfig(device=None if b.cuda else "cpu"))
    samples: list[dict[str, Any]] = []
    try:
        worker.start()
        while not job.done():
            if b.left() < 0:
                raise TimeoutError(f"the product job was not done within the budget (status {job.status})")
            samples += [row for row in store.workers() if row.get("state") == "busy"]
            time.sleep(0.5)
        video = job.result(timeout=0)
        decoded, info = read_frames(video), probe(video)
        nvml = {k: max(r[k] for r in samples if r.get(k) is not None)
                for k in ("gpu_utilization", "gpu_device_memory_used", "gpu_power_w")
                if any(r.get(k) is not None for r in samples)}
        final = next((row for row in store.workers() if row["worker_id"] == worker.worker_id), {})
        rec.update(status=job.status, timings=job.timings,
                   meta={k: v for k, v in job.record.meta.items() if k != "versions"},
                   mp4_bytes=video.stat().st_size, decoded_frames=list(decoded.shape), mp4=dataclass_dict(info),
                   busy_row_samples=len(samples), nvml_max_while_busy=nvml,
                   nvml_note=None if nvml else "no NVML figures: no GPU (or no NVML) in this worker",
                   worker_row={k: final.get(k) for k in (
                       "state", "device", "gpu_name", "gpu_memory_used", "gpu_memory_total", "gpu_utilization",
                       "gpu_device_memory_used", "gpu_device_memory_total", "gpu_power_w", "rss_bytes", "jobs_done")})
    finally:
        worker.stop(timeout=120)
        worker.runner = None  # the loaded pipeline: freed before anything runs after this section
        cluster.close()
        b.save()


def run_product(b: Bench, held: list, work_dir: Path | None, frames: int, steps: int) -> None:
    """Save the benchmark's model, free it (the worker loads its own copy, as a pool worker does: one copy on
    the GPU at a time), run the product job, and remove the checkpoint."""
    work = Path(tempfile.mkdtemp(prefix="mochi-product-", dir=work_dir))
    try:
        checkpoint = save_checkpoint(b, held.pop(), work)
        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()
        bench_product(b, checkpoint, work, frames, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def project(b: Bench, link_gbps: float = 300.0) -> None:
    """text + 64 steps + decode, per option and length. A length an option did not run takes the baseline's
    step-time ratio between lengths; a missing decode takes the baseline's (the VAE is the same)."""
    rows = {(r["option"], r["frames"]): r for r in b.res["runs"] if "step_s" in r}
    base = {f: rows.get(("baseline", f)) for f in b.frames}
    decode = {f: (base[f] or {}).get("decode_s") for f in b.frames}
    if decode[b.frames[1]] is None and decode[b.frames[0]]:
        decode[b.frames[1]] = decode[b.frames[0]] * b.frames[1] / b.frames[0]  # estimate: linear in frames
    ratio, scaled = None, "step scaled from the baseline"
    if all(base.values()):
        ratio = base[b.frames[1]]["step_s"] / base[b.frames[0]]["step_s"]
    elif base[b.frames[0]]:  # the long length did not run: the FLOP model's ratio (attention grows as N^2)
        ratio = flops_ratio(b, base[b.frames[0]])
        scaled = "step scaled from the baseline by the FLOP model"
    out: dict[str, Any] = {}
    for option in dict.fromkeys(r["option"] for r in rows.values()):
        for f in b.frames:
            r, note = rows.get((option, f)), "measured"
            if r is None:
                r0 = rows.get((option, b.frames[0]))
                if r0 is None or ratio is None:
                    continue
                r, note = {**r0, "step_s": r0["step_s"] * ratio, "decode_s": None}, scaled
            dec = r.get("decode_s") if r.get("decode_s") is not None else decode[f]
            denoise = r["step_s"] * STEPS
            out[f"{option}@{f}f"] = {"text_s": r["text_s"], "denoise_64_s": denoise, "decode_s": dec,
                                     "total_s": r["text_s"] + denoise + (dec or 0.0), "note": note}
    for f in b.frames:  # one GPU: the 2-GPU CFG gang projected from the baseline (see the module's docstring)
        r = out.get(f"baseline@{f}f")
        if r is None or f"cfg_parallel@{f}f" in out:
            continue
        step = (r["denoise_64_s"] / STEPS) / 2 + gather_s(b, f, link_gbps)
        out[f"cfg_parallel@{f}f"] = {"text_s": r["text_s"], "denoise_64_s": step * STEPS, "decode_s": r["decode_s"],
                                     "total_s": r["text_s"] + step * STEPS + (r["decode_s"] or 0.0),
                                     "note": f"modelled from 1 GPU: baseline step / 2 + all-gather at "
                                             f"{link_gbps:g} GB/s"}
    b.res["projection"] = out
    mfu = (base[b.frames[0]] or {}).get("mfu")
    cfg = out.get(f"cfg_parallel@{b.frames[0]}f")
    ooms = [r["option"] for r in b.res["runs"] if "oom" in r and r["option"] in DEFAULT_OPTIONS]
    ooms += [name for name, err in b.res.get("errors", {}).items() if "OutOfMemoryError" in err]
    b.res["goals"] = {"denoise_mfu": mfu, "denoise_mfu_ok": None if mfu is None or b.smoke else mfu >= GOALS["denoise_mfu_min"],
                      "cfg_parallel_85f_s": cfg and cfg["total_s"], "cfg_parallel_85f_basis": cfg and cfg["note"],
                      "cfg_parallel_85f_ok": None if cfg is None or b.smoke else cfg["total_s"] <= GOALS["cfg_parallel_85f_64steps_max_s"],
                      "default_options_ooms": ooms, "no_oom_ok": None if b.smoke else not ooms, **GOALS}


def project_gangs(b: Bench, link_gbps: float) -> None:
    """85 and 163 frames at 64 steps on gangs of 2, 4 and 8 GPUs, in the layouts a guided job can use (CFG 2 x
    SP n/2, and SP n over the whole CFG batch). A step measured on such a gang is taken as it is; otherwise it
    is modelled from this device's baseline step at that length (measured, or scaled by the FLOP model): the
    step's work divided by the GPUs, plus the Ulysses traffic at `link_gbps` with no overlap (per layer, each
    rank sends (sp-1)/sp of its q, k, v and attention output, and gathers the other heads of the text output),
    plus the CFG all-gather. The decode: measured split over the gang, else this device's decode at that length
    divided by the ranks it splits over (each needs 2 latent frames), which ignores the exchanges."""
    meta, proj = b.res["meta"], b.res["projection"]
    e = 2 if b.cuda else 4
    rows = {(r["option"], r["frames"]): r for r in b.res["runs"] if "step_s" in r}
    decodes = {(d["gpus"], d["frames"]): d["decode_s"] for d in b.res["decode"]}
    decodes.update({(1, r["frames"]): r["decode_s"] for r in b.res["runs"]
                    if r["option"] == "baseline" and r.get("decode_s")})
    out: dict[str, Any] = {}
    for f in b.frames:
        base = proj.get(f"baseline@{f}f")
        if base is None:
            continue
        step1 = base["denoise_64_s"] / STEPS
        t_lat = (f - 1) // 6 + 1
        v = t_lat * (b.h // 16) * (b.w // 16)
        decode1 = decodes.get((1, f)) or base["decode_s"] or 0.0
        for world in GANG_SIZES:
            for cfg in (2, 1):
                sp = world // cfg
                name = f"cfg{cfg}xsp{sp}"
                measured = rows.get(("cfg_parallel" if name == "cfg2xsp1" else (f"sp{sp}" if cfg == 1 else name), f))
                if measured is not None and measured["gpus"] == world:
                    step, note = measured["step_s"], "step measured"
                else:
                    batch, chunk = 2 // cfg, -(-v // sp)
                    traffic = meta["layers"] * batch * (4 * chunk + meta["text_tokens"]) * meta["width"] * e
                    comm = traffic * (sp - 1) / sp / (link_gbps * 1e9)
                    step = step1 / world + comm + (gather_s(b, f, link_gbps) if cfg == 2 else 0.0)
                    note = f"step modelled: 1-device step / {world} + {comm * 1e3:.1f} ms Ulysses traffic"
                ranks = max(1, min(world, t_lat // 2))
                dec = decodes.get((world, f))
                if dec is None:
                    dec, note = decode1 / ranks, note + f"; decode modelled: 1-device decode / {ranks}"
                out[f"{name}@{f}f"] = {"gpus": world, "text_s": base["text_s"], "denoise_64_s": step * STEPS,
                                       "decode_s": dec, "total_s": base["text_s"] + step * STEPS + dec, "note": note}
    b.res["gang_projection"] = out
    eight = out.get(f"cfg2xsp4@{b.frames[1]}f")
    ok = None if eight is None or b.smoke else eight["total_s"] <= GOALS["gang8_163f_64steps_max_s"]
    b.res["goals"].update(gang8_163f_s=eight and eight["total_s"], gang8_163f_basis=eight and eight["note"],
                          gang8_163f_ok=ok)


def flops_ratio(b: Bench, short: dict[str, Any]) -> float:
    """FLOP/step at the long length over FLOP/step of `short` (same tokens of text)."""
    v = ((b.frames[1] - 1) // 6 + 1) * (b.h // 16) * (b.w // 16)
    n = v + b.res["meta"]["text_tokens"]
    linear, attn = short["step_tflop"] - short["attn_tflop"], short["attn_tflop"]  # linear ~ V, attention ~ N^2
    return (linear * v / short["visual_tokens"] + attn * (n / short["tokens"]) ** 2) / short["step_tflop"]


def gather_s(b: Bench, frames: int, link_gbps: float) -> float:
    """The CFG gang's all-gather of one step's noise prediction (the latent, in the run's dtype) over the link."""
    t_lat = (frames - 1) // 6 + 1
    latent_bytes = 12 * t_lat * (b.h // 8) * (b.w // 8) * (2 if b.cuda else 4)
    return latent_bytes / (link_gbps * 1e9)


def report(b: Bench) -> None:
    m = b.res["meta"]
    print(f"\nMochi through MochiRunner ({'SMOKE: tiny config on CPU, timings not meaningful' if b.smoke else m['device']})")
    print(f"Formula: {FORMULA}; valid text tokens {m.get('text_tokens')}")
    print(f"{'option':<28} {'frames':>6} {'GPUs':>4} {'step s':>9} {'TFLOPS':>8} {'MFU':>7} {'text s':>7} "
          f"{'decode s':>8} {'peak GiB':>8}")
    for r in b.res["runs"]:
        if "step_s" not in r:
            print(f"{r['option']:<28} {r['frames']:>6}  {r.get('oom') or r.get('skipped')}")
            continue
        dec = f"{r['decode_s']:.3g}" if r.get("decode_s") is not None else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
        skips = f"  skipped {r['step_cache_skips']}/{r['step_cache_calls']}" if "step_cache_calls" in r else ""
        print(f"{r['option']:<28} {r['frames']:>6} {r['gpus']:>4} {r['step_s']:>9.4g} {r['achieved_tflops']:>8.3g} "
              f"{r['mfu']:>7.2%} {r['text_s']:>7.3g} {dec:>8} {peak:>8}{skips}")
    print("projected per video at 64 steps (text + denoise + decode):")
    for k, p in b.res["projection"].items():
        print(f"  {k:<32} {p['total_s']:>8.4g} s  ({p['note']})")
    print("on gangs of GPUs, a guided video at 64 steps:")
    for k, p in b.res.get("gang_projection", {}).items():
        print(f"  {k:<20} {p['gpus']} GPUs {p['total_s']:>8.4g} s  ({p['note']})")
    for d in b.res["decode"]:
        peak = d.get("decode_peak_bytes")
        peak = "-" if peak is None else f"{peak / 2**20:.0f} MiB"
        print(f"decode {d['option']:<16} {d['frames']:>4} frames on {d['gpus']} rank(s): {d['decode_s']:.3g} s, "
              f"peak {peak} on this rank ({d.get('decode_peak_measure')})")
    if "cfg_parallel_text" in b.res:
        t = b.res["cfg_parallel_text"]
        print(f"text: each rank encodes {t['encode_s'] * 1e3:.2f} ms; rank 0 encodes and broadcasts "
              f"{t['broadcast_s'] * 1e3:.2f} ms more ({t['embeds_bytes']} bytes)")
    rows = {(r["option"], r["frames"]): r for r in b.res["runs"] if "step_s" in r}
    one, two = rows.get(("baseline", b.frames[0])), rows.get(("cfg_parallel", b.frames[0]))
    for world in GANG_SIZES:
        for name in (f"sp{world}", f"cfg2xsp{world // 2}"):
            r = rows.get((name, b.frames[0]))
            if one and r and r["gpus"] == world:
                print(f"{name} step / baseline step at {b.frames[0]} frames on {world} ranks: "
                      f"{r['step_s'] / one['step_s']:.3f} (all-to-all {r['a2a_s'] * 1e3:.2f} ms/call, "
                      f"gathers {(r['sp_gather_s'] + r['gather_s']) * 1e3:.2f} ms/call)")
    if one and two:
        print(f"CFG-parallel step / baseline step at {b.frames[0]} frames: {two['step_s'] / one['step_s']:.3f} "
              f"(all-gather {two['gather_s_per_step'] * 1e3:.2f} ms/step, stop-flag sync "
              f"{two['sync_s_per_step'] * 1e3:.2f} ms/step)")
    if "product" in b.res:
        p = b.res["product"]
        print(f"product path: job {p.get('status')}, MP4 decoded {p.get('decoded_frames')}, timings "
              f"{json.dumps({k: round(v, 3) for k, v in (p.get('timings') or {}).items()})}, NVML while busy "
              f"{json.dumps(p.get('nvml_max_while_busy'))}")
    print(f"goals: {json.dumps(b.res['goals'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU config (automatic without CUDA)")
    ap.add_argument("--all", action="store_true",
                    help="the benchmark, then the product path (issue 27's standing order)")
    ap.add_argument("--budget-s", type=float, help="skip runs that would overrun this (default 420; --all: 330)")
    ap.add_argument("--product-reserve-s", type=float, default=130.0,
                    help="--all: of the budget, what the benchmark's sections leave to the product path")
    ap.add_argument("--product-frames", type=int, help="the product job's frames (default 31; smoke 7)")
    ap.add_argument("--product-steps", type=int, default=8)
    ap.add_argument("--work-dir", type=Path,
                    help="where the product path's checkpoint and store go (default: a temp dir)")
    ap.add_argument("--fbc-threshold", type=float, default=0.06)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--link-gbps", type=float, default=300.0,
                    help="GPU-GPU bandwidth the multi-GPU projections assume (H100 SXM NVLink: ~300 achieved per GPU)")
    ap.add_argument("--size", help="HxW instead of 480x848 (smoke: 32x48), e.g. 128x224 for a CPU ratio")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    for internal in ("--rank", "--world", "--port"):  # a gang's child process (spawn_ranks)
        ap.add_argument(internal, type=int, help=argparse.SUPPRESS)
    for internal in ("--kind", "--plan", "--hw"):
        ap.add_argument(internal, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="In CPU autocast")  # Mochi RoPE's fp32 autocast on CPU (smoke)
    if a.rank is not None:
        return rank_main(a)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s if a.budget_s is not None else (330.0 if a.all else 420.0)
    b = Bench(a.out_dir, a.smoke or not torch.cuda.is_available(), budget, a.product_reserve_s if a.all else 0.0)
    if a.size:
        b.h, b.w = map(int, a.size.split("x"))
    if b.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    gpus = torch.cuda.device_count() if b.cuda else 0
    b.res["gpu_name"] = torch.cuda.get_device_name() if b.cuda else None
    b.res["meta"] = {
        "mode": "smoke" if b.smoke else "full", "gpus": gpus, "budget_s": budget,
        "device": b.res["gpu_name"] or f"cpu x{os.cpu_count()} {platform.machine()}",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0],
        "dtype": str(b.dtype), "height": b.h, "width": b.w, "guidance_scale": GUIDANCE,
        "steps_projected": STEPS, "peak_tflops": PEAK_TFLOPS, "flop_formula": FORMULA, "anchors": ANCHORS,
        "link_gbps_assumed": a.link_gbps, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    t = time.monotonic()
    pipe = build_pipe(b.smoke, b.dev, b.dtype)
    tc = pipe.transformer.config
    b.res["meta"].update(build_s=time.monotonic() - t, layers=tc.num_layers, heads=tc.num_attention_heads,
                         width=tc.num_attention_heads * tc.attention_head_dim,
                         transformer_params=sum(p.numel() for p in pipe.transformer.parameters()),
                         text_encoder_params=sum(p.numel() for p in pipe.text_encoder.parameters()),
                         weights_bytes=torch.cuda.memory_allocated() if b.cuda else None)
    # Sections in order of what the goals need most; each runs only if it fits what is left of the budget.
    section(b, "baseline", lambda: bench_baseline(b, pipe))
    base = next((r for r in b.res["runs"] if r["option"] == "baseline"), None)
    section(b, "first_block_cache", lambda: fits(b, base, 3.0) and bench_cache(b, pipe, a.fbc_threshold))
    if gpus >= 2 or b.smoke:
        plan = [[b.frames[0], 2], [b.frames[0], b.steps]]
        section(b, "cfg_parallel", lambda: fits(b, base, 3.0) and bench_cfg_parallel(b, pipe, plan))
    else:
        b.res["cfg_parallel_skipped"] = (f"{gpus} GPU: the CFG-parallel gang needs 2 GPUs in one machine; its 85- and "
                                         "163-frame projections are modelled from this GPU's baseline")
    # Sequence parallelism, CFG x SP and the split decode, on gangs of GPUs. A smoke run measures the gang of 8 (every
    # layout, the most ranks) and models the smaller ones as a GPU machine with fewer GPUs does.
    for world in GANG_SIZES:
        if gpus >= world or (b.smoke and world == GANG_SIZES[-1]):
            section(b, f"gang{world}", lambda: fits(b, base, 2.0 + world / 4) and bench_gang(b, pipe, world))
        elif b.smoke:
            b.res[f"gang{world}_skipped"] = (f"smoke: the gang of {GANG_SIZES[-1]} runs every layout; the gang of "
                                             f"{world} is modelled from the baseline")
        else:
            b.res[f"gang{world}_skipped"] = (f"{gpus} GPU: a gang of {world} needs {world} GPUs in one machine; its "
                                             "projections are modelled from this GPU's baseline")
    section(b, "attention", lambda: fits(b, base, 2.0) and bench_attention(b, pipe))
    section(b, "vae_untiled", lambda: fits(b, base, 1.0) and bench_vae_untiled(b, pipe))
    section(b, "baseline_long", lambda: base is not None and bench_baseline_long(b, pipe, base))
    section(b, "decode_one", lambda: fits(b, base, 1.5) and bench_decode_one(b, pipe))
    if a.no_compile or not fits(b, base, 2.0, margin=30 if b.smoke else 120):
        b.res["compile_skipped"] = "disabled or over budget"
    else:  # last of the benchmark: it changes the blocks in place
        section(b, "compile", lambda: bench_compile(b, pipe))
    if a.all:
        b.release_reserve()
        held, pipe = [pipe], None  # the product section drops the last reference once the model is saved
        frames = a.product_frames or (b.frames[0] if b.smoke else 31)
        section(b, "product", lambda: run_product(b, held, a.work_dir, frames, a.product_steps))
    project(b, a.link_gbps)
    project_gangs(b, a.link_gbps)
    b.save()
    if b.cuda:  # every real GPU run is kept, named by date and GPU
        a.results_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", b.res["gpu_name"]).strip("-").lower()
        (a.results_dir / f"{b.res['meta']['date'][:10]}-{slug}.json").write_text((b.out / "gpu_mochi.json").read_text())
    report(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
