"""Live previews: what one costs against a denoising step, and how big it is. Prints numbers.

    python benchmarks/preview_bench.py [--steps 40] [--size 96x64x19] [--repeat 3]

(i)  the tiny model at --size: the median denoising step without previews, and the preview's work at a
     preview step: x0 + the 12->3 map (in the sampler's callback) and the WebP strip (`encode_strip`);
(ii) the full-size latent of an 85-frame 848x480 video (12 x 15 x 60 x 106): the same two costs on this
     machine's CPU, and the strip's size in bytes. On a GPU the map is one small matmul on the device.
The map's fit (held-out r2) on the tiny model's random VAE is printed too. One preview is saved under
artifacts/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mochi_lab.config import Settings
from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import load_runner
from mochi_lab.pipelines.preview import PreviewPlan, encode_strip, estimate_x0

REPO = Path(__file__).resolve().parents[1]


def _median_ms(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def step_times(runner, params: GenerationParams, plan: PreviewPlan | None) -> list[float]:
    marks: list[float] = []
    runner.generate(params, lambda i, n: marks.append(time.perf_counter()), preview=plan)
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", default="96x64x19", help="WxHxFRAMES of the tiny-model run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    width, height, frames = map(int, args.size.split("x"))
    runner = load_runner("tiny", Settings.from_env().cache_dir)
    params = GenerationParams.parse("a cat surfing a wave", seed=1, num_frames=frames, height=height, width=width,
                                    num_inference_steps=args.steps)
    m = runner.preview_map
    print(f"preview_bench: {os.cpu_count()} CPUs, torch {torch.__version__}; tiny model at {width}x{height}, "
          f"{frames} frames, {args.steps} steps; map fit on its VAE: held-out r2 {m.r2:.3f}")
    step_times(runner, params, None)  # warm-up
    shots: list[np.ndarray] = []
    plain_steps, preview_steps = [], []
    for _ in range(args.repeat):  # interleaved: a shared machine's drift hits both alike
        plain_steps += step_times(runner, params, None)
        plan = PreviewPlan(lambda s, f: shots.append(f), every=1, min_interval_s=0)
        preview_steps += step_times(runner, params, plan)
    plain, with_every_step = statistics.median(plain_steps), statistics.median(preview_steps)
    channels, lt = 12, (frames - 1) // 6 + 1
    before, after = torch.randn(1, channels, lt, height // 8, width // 8), torch.randn(1, channels, lt, height // 8, width // 8)
    project = _median_ms(lambda: m.frames(estimate_x0(before, after, 0.5, 0.6, 1.0)))
    strip = encode_strip(shots[-1])
    encode = _median_ms(lambda: encode_strip(shots[-1]))
    rows = [
        ("(i) denoising step, no previews, median ms", f"{plain * 1e3:.2f}"),
        ("(i) denoising step, a preview every step, median ms", f"{with_every_step * 1e3:.2f}"),
        ("(i) x0 + map at a preview step, ms (ratio to a step)", f"{project:.3f}  ({project / (plain * 1e3):.4f})"),
        ("(i) WebP strip, ms; bytes", f"{encode:.2f}; {len(strip)}"),
    ]
    # the full-size latent: 85 frames of 848x480
    full = (1, channels, 15, 60, 106)
    fb, fa = torch.randn(full), torch.randn(full)
    project_full = _median_ms(lambda: m.frames(estimate_x0(fb, fa, 0.5, 0.6, 1.0)), n=10)
    full_frames = m.frames(estimate_x0(fb, fa, 0.5, 0.6, 1.0))
    t0 = time.perf_counter()
    full_strip = encode_strip(full_frames)
    encode_full = (time.perf_counter() - t0) * 1e3
    rows += [
        ("(ii) 85x848x480 latent (12x15x60x106): x0 + map on this CPU, ms", f"{project_full:.1f}"),
        ("(ii) its WebP strip (15 frames of 106x60), ms; bytes", f"{encode_full:.1f}; {len(full_strip)}"),
    ]
    out = REPO / "artifacts" / "preview_tiny.webp"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(strip)
    rows.append(("saved", str(out.relative_to(REPO))))
    width_col = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width_col}}  {v}")


if __name__ == "__main__":
    main()
