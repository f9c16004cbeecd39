"""The live figures of one running job (elapsed, rate, ETA, the last preview's step), from its own steps."""

from __future__ import annotations

import time
from typing import Any

from mochi_lab.params import GenerationParams


class JobClock:
    """The live figures of one running attempt, from its own measured steps: elapsed_s, rate (steps/s,
    over the later half of the steps so far), eta_s (the steps left at that rate, plus decode and encode
    as long as this worker's past jobs took per pixel; left out until it has done one), and the last
    stored preview's step."""

    def __init__(self, params: GenerationParams, post_s_per_px: float | None, started: float):
        self.total = params.num_inference_steps
        self.pixels = params.num_frames * params.height * params.width
        self.post_s = None if post_s_per_px is None else post_s_per_px * self.pixels
        self.started = started  # monotonic, at the claim
        self.step_times: dict[int, float] = {}
        self.denoised: float | None = None
        self.preview_step: int | None = None

    def live(self, step: int) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {"elapsed_s": round(now - self.started, 3)}
        self.step_times.setdefault(step, now)
        rate = None
        if step >= 2:  # over the later half of the steps so far: it follows a machine that speeds up or
            since = max(1, step // 2)  # slows down, and skips the first step's warm-up
            rate = (step - since) / max(now - self.step_times.get(since, now), 1e-9)
        if step >= self.total and self.denoised is None:
            self.denoised = now
        if rate is not None:
            out["rate"] = round(rate, 3)
        left = None
        if self.denoised is not None:
            left = max(0.0, (self.post_s or 0.0) - (now - self.denoised)) if self.post_s is not None else None
        elif rate is not None:
            left = (self.total - step) / rate + (self.post_s or 0.0)
        if left is not None:
            out["eta_s"] = round(left, 3)
        if self.preview_step is not None:
            out["preview_step"] = self.preview_step
        return out

    def post_s_per_px(self, post_s: float, before: float | None) -> float:
        """This job's decode + encode time per pixel, averaged with the worker's past ones."""
        now = post_s / max(self.pixels, 1)
        return now if before is None else 0.5 * before + 0.5 * now
