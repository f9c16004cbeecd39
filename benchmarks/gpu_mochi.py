"""Mochi 1 denoise/decode benchmark on one GPU: where the ~300 s per video goes, and what each option buys.

Builds the full-size diffusers ``MochiTransformer3DModel()`` (48 layers, dim 3072, = mochi-1-preview) and
``AutoencoderKLMochi()`` with random weights in bf16 (no hub access needed; timing does not depend on the weights),
then measures one denoising step with classifier-free guidance (batch 2) at 848x480 for 85 and 163 frames:
baseline bf16 + SDPA, First Block Cache (diffusers hooks), regional ``torch.compile``, the cost of model CPU
offload, and VAE decode (tiled vs untiled, bf16). It projects a 64-step video: denoise step x 64 + decode.

FLOP model (stated in the output too). With V visual tokens, N = V + text tokens, L layers, width d, FF width f:
    FLOP/pass = 2*L*(4*d^2 + 3*d*f) * V  +  4*N^2*d*L        (linear layers + attention QK^T and PV)
Full size: 2*48*(4*3072^2 + 3*3072*8192) = 10.87 GFLOP per visual token, attention 4*N^2*3072*48.
V = T_lat*(H/16)*(W/16), T_lat = (frames-1)//6 + 1 (VAE /8 spatially, then 2x2 patches); text tokens 256.
FLOP/step = 2 * FLOP/pass (CFG). MFU = achieved FLOP/s / 989 TFLOPS (H100 SXM dense bf16).
At 85 frames: V = 23,850, ~0.60 PFLOP/pass, 64 steps = 77 PFLOP = 78 s at 100% MFU.

Usage: python benchmarks/gpu_mochi.py OUT_DIR [--smoke]. Without CUDA it runs a tiny float32 smoke config that
exercises the same code paths and writes the same JSON (OUT_DIR/gpu_mochi.json); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

PEAK_TFLOPS = 989.0
STEPS = 64
FORMULA = ("FLOP/pass = 2*L*(4d^2+3df)*V + 4*N^2*d*L  [full size: 10.87 GFLOP*V + 4*N^2*3072*48], "
           "V = T_lat*(H/16)*(W/16), N = V + text tokens, FLOP/step = 2*FLOP/pass (CFG batch 2), "
           f"MFU vs {PEAK_TFLOPS:.0f} TFLOPS bf16")
ANCHORS = {"seed_h100_84f_s": 300, "paraattention_a100_84f_s": 196, "paraattention_a100_compile_s": 150,
           "teacache_speedup": "1.5-2.1x", "physical_limit_85f_64steps_h100_s": 78}
TINY_TRANSFORMER = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, pooled_projection_dim=16,
                        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32,
                        time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)
TINY_VAE = dict(latent_channels=12, encoder_block_out_channels=(32, 32, 32, 32),
                decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))


class Bench:
    """Shared state: device, models, deadline and the JSON being built (rewritten after every section)."""

    def __init__(self, out_dir: Path, smoke: bool, budget_s: float, iters: int) -> None:
        self.out, self.smoke, self.iters = out_dir, smoke, iters
        self.cuda = torch.cuda.is_available() and not smoke
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.t0, self.deadline = time.monotonic(), time.monotonic() + budget_s
        self.base: int | None = None  # allocated bytes once the models are loaded (set after build)
        # Smoke sizes keep the real aspect of the work (two lengths, tiling that actually tiles) at toy cost.
        self.h, self.w = (480, 848) if not smoke else (32, 48)
        self.frame_counts = (85, 163) if not smoke else (7, 13)
        self.text_tokens = 256 if not smoke else 16
        self.res: dict[str, Any] = {"meta": {}, "denoise": [], "step_cache": {}, "offload": {}, "vae": [],
                                    "projection": {}, "memory_checks": [], "memory_ok": None}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timeit(self, fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return times

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def allocated(self) -> int | None:
        gc.collect()
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else None

    def mem_check(self, label: str) -> dict[str, Any]:
        """Allocated memory must return to the post-load baseline after each config (the creeping-memory pitfall)."""
        now = self.allocated()
        ok = None if now is None else now - self.base <= 16 * 2**20  # allocator rounding slack
        row = {"config": label, "baseline_bytes": self.base, "after_bytes": now,
               "growth_bytes": None if now is None else now - self.base, "ok": ok}
        self.res["memory_checks"].append(row)
        return row

    def save(self) -> None:
        self.res["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        (self.out / "gpu_mochi.json").write_text(json.dumps(self.res, indent=2, default=str))


def build(b: Bench) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import AutoencoderKLMochi, MochiTransformer3DModel

    # Initialising directly on the GPU in the target dtype: a 10B-parameter fp32 init on the CPU takes minutes.
    old = torch.get_default_dtype()
    torch.set_default_dtype(b.dtype)
    try:
        with torch.device(b.dev):
            tr = MochiTransformer3DModel(**(TINY_TRANSFORMER if b.smoke else {})).to(b.dtype).eval()
            vae = AutoencoderKLMochi(**(TINY_VAE if b.smoke else {})).to(b.dtype).eval()
    finally:
        torch.set_default_dtype(old)
    vae.encoder = None  # decode-only benchmark; frees the encoder's weights
    return tr, vae


def flops(tr: torch.nn.Module, frames: int, b: Bench) -> dict[str, float]:
    c = tr.config
    d, L = c.num_attention_heads * c.attention_head_dim, c.num_layers
    f = tr.transformer_blocks[0].ff_inner_dim
    t_lat = (frames - 1) // 6 + 1
    v = t_lat * (b.h // 16) * (b.w // 16)
    n = v + b.text_tokens
    linear, attn = 2 * L * (4 * d * d + 3 * d * f) * v, 4 * n * n * d * L
    return {"latent_frames": t_lat, "visual_tokens": v, "tokens": n, "linear_gflop_per_token": linear / v / 1e9,
            "pass_tflop": (linear + attn) / 1e12, "step_tflop": 2 * (linear + attn) / 1e12}


def inputs(tr: torch.nn.Module, frames: int, b: Bench, gen: torch.Generator) -> dict[str, torch.Tensor]:
    c, t_lat = tr.config, (frames - 1) // 6 + 1
    mk = lambda *s: torch.randn(*s, generator=gen, device=b.dev, dtype=b.dtype)  # noqa: E731
    return {"hidden_states": mk(2, c.in_channels, t_lat, b.h // 8, b.w // 8),
            "encoder_hidden_states": mk(2, b.text_tokens, c.text_embed_dim),
            # All text tokens valid: Mochi's processor attends only to unmasked text, and the formula assumes 256.
            "encoder_attention_mask": torch.ones(2, b.text_tokens, dtype=torch.bool, device=b.dev),
            "timestep": torch.full((2,), 500.0, device=b.dev, dtype=b.dtype)}


def run_step(tr: torch.nn.Module, x: dict[str, torch.Tensor], cached: bool = False) -> torch.Tensor:
    with torch.inference_mode():
        if cached:  # the cache hooks keep their state per context, like MochiPipeline's "cond_uncond"
            with tr.cache_context("cond_uncond"):
                return tr(**x, return_dict=False)[0]
        return tr(**x, return_dict=False)[0]


def denoise(b: Bench, tr: torch.nn.Module, option: str, frames: int, gen: torch.Generator) -> dict[str, Any]:
    fl = flops(tr, frames, b)
    row: dict[str, Any] = {"option": option, "frames": frames, **fl}
    x = inputs(tr, frames, b, gen)
    b.reset_peak()
    times = b.timeit(lambda x=x: run_step(tr, x), warmup=1, iters=b.iters)
    step = statistics.median(times)
    row.update(step_s=step, step_s_all=times, achieved_tflops=fl["step_tflop"] / step,
               mfu=fl["step_tflop"] / step / PEAK_TFLOPS, denoise_64_s=step * STEPS, peak_bytes=b.peak(),
               ideal_64_s=STEPS * fl["step_tflop"] / PEAK_TFLOPS)  # the 100%-MFU floor
    row["peak_over_baseline_bytes"] = None if b.base is None else row["peak_bytes"] - b.base  # activations
    del x
    row["memory"] = b.mem_check(f"{option}@{frames}f")
    return row


def section(b: Bench, name: str, fn: Callable[[], None]) -> None:
    """Run one section; record failures (OOM included) instead of losing the rest of a scarce GPU run."""
    t = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        b.res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    # Outside the except block: its traceback pins the failed section's tensors until the block ends.
    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()
    print(f"[{name}] {time.monotonic() - t:.1f}s, {b.left():.0f}s of budget left", flush=True)
    b.save()


def bench_baseline(b: Bench, tr: torch.nn.Module, gen: torch.Generator, option: str = "baseline_sdpa",
                   extra_s: float = 0.0) -> None:
    first = denoise(b, tr, option, b.frame_counts[0], gen)
    b.res["denoise"].append(first)
    # Skip the long video if its predicted cost (attention grows as N^2) does not fit the remaining budget.
    long = flops(tr, b.frame_counts[1], b)["step_tflop"] / first["step_tflop"]
    if b.left() > (b.iters + 1) * first["step_s"] * long + 30 + extra_s:
        b.res["denoise"].append(denoise(b, tr, option, b.frame_counts[1], gen))
    else:
        b.res["denoise"].append({"option": option, "frames": b.frame_counts[1], "skipped": "time budget"})


def bench_cache(b: Bench, tr: torch.nn.Module, gen: torch.Generator, threshold: float) -> None:
    """First Block Cache. Random weights make the real hit rate unknowable, so measure the cost of a miss and of a
    hit separately (thresholds that force each) and project 64 steps over skip ratios; also report the ratio seen on
    a synthetic Euler trajectory at `threshold`, which is only indicative."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    frames = b.frame_counts[0]
    x = inputs(tr, frames, b, gen)
    out: dict[str, Any] = {"frames": frames, "threshold": threshold,
                           "api": "transformer.enable_cache(FirstBlockCacheConfig(threshold))"}
    counts = {"calls": 0, "skips": 0}

    def enable(th: float) -> None:
        tr.enable_cache(FirstBlockCacheConfig(threshold=th))
        hook = HookRegistry.check_if_exists_or_initialize(tr.transformer_blocks[0]).get_hook("fbc_leader_block_hook")
        decide = hook._should_compute_remaining_blocks

        def counted(residual: torch.Tensor) -> bool:  # count hits: the hook does not expose them
            compute = decide(residual)
            counts["calls"] += 1
            counts["skips"] += not compute
            return compute
        hook._should_compute_remaining_blocks = counted

    b.reset_peak()
    for key, th in (("miss", -1.0), ("hit", float("inf"))):  # -1: never skip; inf: skip after the 1st call
        enable(th)
        counts.update(calls=0, skips=0)
        out[f"{key}_step_s"] = statistics.median(b.timeit(lambda x=x: run_step(tr, x, True), 1, b.iters))
        out[f"{key}_skips"] = f"{counts['skips']}/{counts['calls']}"  # expect 0/n and n-1/n; NaNs would break it
        tr.disable_cache()
    enable(threshold)
    counts.update(calls=0, skips=0)
    lat, finite = x["hidden_states"].clone(), True
    n_traj = 6 if not b.smoke else 4
    for i in range(n_traj):  # Euler steps of a 64-step schedule, velocity normalised so random weights stay finite
        v = run_step(tr, {**x, "hidden_states": lat, "timestep": x["timestep"] * 0 + 1000 * (1 - i / STEPS)}, True)
        finite &= bool(torch.isfinite(v).all())
        lat = lat - (1 / STEPS) * v / v.float().std().clamp(min=1e-6).to(v.dtype)
    tr.disable_cache()
    del x, lat, v
    r = counts["skips"] / max(counts["calls"], 1)
    proj = lambda s: STEPS * ((1 - s) * out["miss_step_s"] + s * out["hit_step_s"])  # noqa: E731
    out.update(observed_skip_ratio=r, observed_note="random weights: indicative only", trajectory_steps=n_traj,
               outputs_finite=finite, peak_bytes=b.peak(), denoise_64_s_at_observed=proj(r),
               denoise_64_s_by_skip_ratio={f"{s:.2f}": proj(s) for s in (0.0, 0.33, 0.5, 0.6)})
    out["memory"] = b.mem_check("first_block_cache")  # after disable_cache: cached residuals must be gone
    b.res["step_cache"] = out


def bench_offload(b: Bench, tr: torch.nn.Module) -> None:
    """Model CPU offload (enable_model_cpu_offload) moves each whole model onto the GPU for its stage and back:
    per video that is one host->device and one device->host copy of the transformer, timed here for real."""
    nbytes = sum(p.numel() * p.element_size() for p in tr.parameters())
    out: dict[str, Any] = {"transformer_bytes": nbytes}
    if not b.cuda:
        out.update(skipped="no CUDA: nothing to offload to", d2h_s=None, h2d_s=None, per_video_s=None)
        b.res["offload"] = out
        return
    t = time.perf_counter()
    tr.to("cpu")
    b.sync()
    out["d2h_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tr.to(b.dev)
    b.sync()
    out["h2d_s"] = time.perf_counter() - t
    gbps = nbytes / out["h2d_s"] / 1e9
    # T5-XXL encoder (4.76B params, bf16) makes the same round trip; estimated at the measured bandwidth.
    t5 = 4.76e9 * 2 / gbps / 1e9
    out.update(h2d_gb_per_s=gbps, t5_round_trip_est_s=2 * t5, per_video_s=out["d2h_s"] + out["h2d_s"] + 2 * t5,
               note="pageable host memory as accelerate uses it; sequential/group offload is far slower")
    out["memory"] = b.mem_check("offload_round_trip")
    b.res["offload"] = out


def bench_vae(b: Bench, vae: torch.nn.Module, gen: torch.Generator) -> None:
    frames = b.frame_counts[0]
    t_lat = (frames - 1) // 6 + 1
    z = torch.randn(1, 12, t_lat, b.h // 8, b.w // 8, generator=gen, device=b.dev, dtype=b.dtype)
    if b.smoke:  # 24 px tiles (3 latents), stride 16: the tiled path really tiles the 32x48 toy frame (2x3 tiles)
        vae.enable_tiling(24, 24, 16, 16)
    with torch.inference_mode():
        vae.decode(z[:, :, :2, :16, :16])  # one small warm-up decode: cuDNN handles and kernels
    for tiled in (True, False):
        row: dict[str, Any] = {"frames": frames, "tiled": tiled, "dtype": str(b.dtype).removeprefix("torch.")}
        if not tiled and b.res["vae"] and b.left() < 3 * b.res["vae"][0].get("decode_s", 0) + 30:
            row["skipped"] = "time budget"
        else:
            vae.use_tiling = tiled
            b.reset_peak()
            try:
                with torch.inference_mode():
                    t = time.perf_counter()
                    video = vae.decode(z, return_dict=False)[0]
                    b.sync()
                    row.update(decode_s=time.perf_counter() - t, output_shape=list(video.shape), peak_bytes=b.peak())
                    # The weights already resident count towards the peak; this is what decode itself adds.
                    row["peak_over_baseline_bytes"] = None if b.base is None else row["peak_bytes"] - b.base
                    del video
            except torch.cuda.OutOfMemoryError as e:  # the known pitfall: record it, free, carry on
                row.update(oom=True, error=str(e).splitlines()[0], peak_bytes=b.peak())
            if row.get("oom"):  # after the except block, once its traceback no longer pins the activations
                gc.collect()
                torch.cuda.empty_cache()
            row["memory"] = b.mem_check(f"vae_{'tiled' if tiled else 'untiled'}")
        b.res["vae"].append(row)
    del z


def bench_compile(b: Bench, tr: torch.nn.Module, gen: torch.Generator) -> None:
    """Regional compile, as diffusers' compile_repeated_blocks does: each block is compiled, and the 48 blocks share
    one graph, so compiling costs one block (plus the last block's variant), not 48. Mochi's attention processor
    calls torch.nonzero on the text mask; capturing that op as a dynamic shape keeps each block one graph (checked
    with inductor on CPU: 4 graphs, no breaks, vs 13 graphs and 6 breaks without). If that fails, retry with breaks."""
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # 2 block variants x 2 shapes, with room to spare
    backend = "eager" if b.smoke else "inductor"  # smoke: exercise dynamo tracing without a long C++ build
    for blk in tr.transformer_blocks:
        blk.compile(backend=backend, dynamic=False)
    t = time.monotonic()
    for capture in (True, False):
        dynamo.config.capture_dynamic_output_shape_ops = capture
        b.res["meta"]["compile_capture_dynamic_output_shape_ops"] = capture
        try:
            bench_baseline(b, tr, gen, option=f"compile_{backend}", extra_s=0 if b.smoke else 90)  # + recompile
            break
        except Exception as e:  # noqa: BLE001 - fall back to graph breaks, keep the reason
            b.res.setdefault("errors", {})[f"compile_capture_{capture}"] = f"{type(e).__name__}: {e}"[:2000]
            dynamo.reset()
            b.res["denoise"] = [r for r in b.res["denoise"] if r["option"] != f"compile_{backend}"]
            if not capture or b.left() < 150:
                raise
    b.res["meta"]["compile_section_s"] = time.monotonic() - t  # includes compilation (warm-up runs)


def project(b: Bench) -> None:
    decode = next((r["decode_s"] for r in b.res["vae"] if "decode_s" in r), None)
    proj: dict[str, Any] = {}
    for r in b.res["denoise"]:
        if "step_s" in r:
            # Decode was measured at the short length only; scale by frames for the long one (an estimate).
            dec = None if decode is None else decode * r["frames"] / b.frame_counts[0]
            proj[f"{r['option']}@{r['frames']}f"] = {"denoise_s": r["denoise_64_s"], "decode_s": dec,
                                                     "total_s": r["denoise_64_s"] + (dec or 0.0)}
    c, off = b.res["step_cache"], b.res["offload"]
    base = proj.get(f"baseline_sdpa@{b.frame_counts[0]}f")
    if base and "denoise_64_s_at_observed" in c:
        fbc = c["denoise_64_s_by_skip_ratio"]["0.50"]
        proj["first_block_cache@skip0.5"] = {"denoise_s": fbc, "total_s": fbc + (base["decode_s"] or 0.0)}
    if base and off.get("per_video_s"):
        proj["baseline_sdpa+model_offload"] = {"total_s": base["total_s"] + off["per_video_s"]}
    b.res["projection"] = proj


def report(b: Bench) -> None:
    print(f"\nMochi benchmark ({'SMOKE: tiny config, numbers not meaningful' if b.smoke else b.res['meta']['device']})")
    print(f"Formula: {FORMULA}")
    print(f"{'option':<18} {'frames':>6} {'tokens':>7} {'TFLOP/step':>10} {'step s':>9} {'TFLOPS':>9} {'MFU':>7}"
          f" {'64-step s':>9} {'@100% MFU':>9}")
    for r in b.res["denoise"]:
        if "step_s" in r:
            print(f"{r['option']:<18} {r['frames']:>6} {r['tokens']:>7} {r['step_tflop']:>10.4g} {r['step_s']:>9.4g}"
                  f" {r['achieved_tflops']:>9.3g} {r['mfu']:>7.2%} {r['denoise_64_s']:>9.4g} {r['ideal_64_s']:>9.3g}")
        else:
            print(f"{r['option']:<18} {r['frames']:>6}  skipped: {r.get('skipped')}")
    c = b.res["step_cache"]
    if "miss_step_s" in c:
        print(f"first block cache: miss {c['miss_step_s']:.4g}s hit {c['hit_step_s']:.4g}s, skip ratio "
              f"{c['observed_skip_ratio']:.2f} (random weights, indicative), 64 steps @0.5 skip "
              f"{c['denoise_64_s_by_skip_ratio']['0.50']:.4g}s")
    if b.res["offload"].get("per_video_s"):
        o = b.res["offload"]
        print(f"model offload: +{o['per_video_s']:.3g}s/video (H2D {o['h2d_gb_per_s']:.3g} GB/s)")
    for r in b.res["vae"]:
        what = f"{r['decode_s']:.4g}s" if "decode_s" in r else ("OOM" if r.get("oom") else r.get("skipped"))
        peak = f", peak {r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else ""
        print(f"VAE decode {r['frames']}f {'tiled' if r['tiled'] else 'untiled'} {r['dtype']}: {what}{peak}")
    for k, p in b.res["projection"].items():
        print(f"projected video {k}: {p['total_s']:.4g}s")
    ok = b.res["memory_ok"]
    print(f"memory back to baseline after every config: {'n/a (no CUDA)' if ok is None else ok}")
    print("anchors: seed ~300 s per 84-frame video (H100); ParaAttention A100 196 s, 150 s compiled; "
          "TeaCache 1.5-2.1x; 100% MFU floor 78 s (85 frames, 64 steps)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU config (automatic without CUDA)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip sections that would overrun this")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per config (after 1 warm-up)")
    ap.add_argument("--fbc-threshold", type=float, default=0.06)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    b = Bench(a.out_dir, a.smoke or not torch.cuda.is_available(), a.budget_s, a.iters)
    if b.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules kept in float32: []" noise from .to(dtype)
    warnings.filterwarnings("ignore", message="In CPU autocast")  # Mochi RoPE's fp32 autocast on CPU (smoke)

    cpu = f"cpu x{os.cpu_count()} {platform.machine()}"
    b.res["meta"] = {
        "mode": "smoke" if b.smoke else "full", "device": torch.cuda.get_device_name() if b.cuda else cpu,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0],
        "dtype": str(b.dtype), "height": b.h, "width": b.w, "text_tokens": b.text_tokens, "iters": b.iters,
        "steps_projected": STEPS, "peak_tflops": PEAK_TFLOPS, "flop_formula": FORMULA, "anchors": ANCHORS,
        # Which SDPA kernels torch may pick (flash on H100 bf16 unless disabled): the attention half of the FLOPs.
        "sdpa_enabled": {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                         for k in ("flash", "cudnn", "mem_efficient")}}
    t = time.monotonic()
    tr, vae = build(b)
    b.base = b.allocated()
    b.res["meta"].update(build_s=time.monotonic() - t, weights_bytes=b.base,
                         transformer_params=sum(p.numel() for p in tr.parameters()))
    gen = torch.Generator(device=b.dev).manual_seed(0)
    section(b, "baseline", lambda: bench_baseline(b, tr, gen))
    section(b, "step_cache", lambda: bench_cache(b, tr, gen, a.fbc_threshold))
    section(b, "offload", lambda: bench_offload(b, tr))
    section(b, "vae", lambda: bench_vae(b, vae, gen))
    # Compile last: it changes the model in place, and it is the most expensive section to warm up.
    if a.no_compile or b.left() < (30 if b.smoke else 150):
        b.res["denoise"].append({"option": "compile", "frames": b.frame_counts[0], "skipped": "disabled or budget"})
    else:
        section(b, "compile", lambda: bench_compile(b, tr, gen))
    checks = [m["ok"] for m in b.res["memory_checks"]]
    b.res["memory_ok"] = None if not b.cuda else all(checks)
    project(b)
    b.save()
    report(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
