"""The live figures of one running job (elapsed, rate, ETA, the fraction of the whole job done, the last
preview's step), from its own steps and this worker's pace on its past jobs."""

from __future__ import annotations

import threading
import time
from typing import Any

from mochi_lab.params import GenerationParams

# A worker's stages that are one long call with no steps of its own to report: the worker writes the figures
# again while they run (mochi_lab.worker.job), so its views' elapsed time and ETA keep moving.
TICKING = frozenset({"loading", "decoding", "encoding"})
TIMED = ("text", "denoise", "decode", "encode")  # the stages a worker times on every job (their `<stage>_s`)
FRACTION_MAX = 0.999  # a running job is never shown finished: only its end says that


def units(params: GenerationParams) -> dict[str, float]:
    """What each timed stage's time grows with: one text encoding per job; the denoising steps times the
    output's pixels (frames x height x width); the output's pixels for the VAE decode and the MP4 encode."""
    pixels = float(params.num_frames * params.height * params.width)
    return {"text": 1.0, "denoise": pixels * params.num_inference_steps, "decode": pixels, "encode": pixels}


class Pace:
    """This worker's seconds per unit (`units`) of each timed stage, per model, from its past jobs: each
    new job's figure is averaged with the one before, so the pace follows a machine that changes."""

    def __init__(self) -> None:
        self.per_unit: dict[tuple[str, str], float] = {}

    def expect(self, params: GenerationParams) -> dict[str, float | None]:
        """Each timed stage's expected seconds for a job of these params (None: no past job to go by)."""
        out: dict[str, float | None] = {}
        for stage, n in units(params).items():
            rate = self.per_unit.get((params.model, stage))
            out[stage] = None if rate is None else rate * n
        return out

    def learn(self, params: GenerationParams, timings: dict[str, float]) -> None:
        """Take a done job's `<stage>_s` timings into the pace."""
        for stage, n in units(params).items():
            seconds = timings.get(f"{stage}_s")
            if not isinstance(seconds, (int, float)) or seconds < 0 or n <= 0:
                continue
            now = seconds / n
            before = self.per_unit.get((params.model, stage))
            self.per_unit[(params.model, stage)] = now if before is None else 0.5 * before + 0.5 * now


class JobClock:
    """The live figures of one running attempt, for each progress write (`live(stage, step)`) and again while
    a long call runs (`now()`): `elapsed_s` since the claim; `rate` (steps/s, over the later half of the
    steps so far); `eta_s`, what is left: the steps left at that rate (before two steps, at this worker's
    past pace), then the decode and the encode at its past pace, counting down while they run (the steps
    alone before its first decode; left out while loading); `fraction`, the share of the whole
    job done, from its submission: the time it has taken (queue, load and this attempt so far) over that
    plus `eta_s`, so each stage weighs what it is expected to take (absent where `eta_s` leaves a stage
    out; it never goes back within an attempt); and the last stored preview's step.

    Thread-safe: the job's thread writes at each stage and step, the ticker's between them."""

    def __init__(self, params: GenerationParams, pace: Pace | None, started: float, waited_s: float = 0.0):
        self.total = params.num_inference_steps
        self.expected = (pace or Pace()).expect(params)
        self.started = started  # monotonic, at the claim
        self.waited_s = max(0.0, waited_s)  # from the job's submission to the claim
        self.stage: str | None = None
        self.step: int | None = None
        self.stage_since = started
        self.step_times: dict[int, float] = {}
        self.preview_step: int | None = None
        self._fraction = 0.0
        self._lock = threading.Lock()

    def live(self, stage: str, step: int | None = None) -> dict[str, Any]:
        """The figures as `stage` (and denoising `step`) is reported now."""
        with self._lock:
            now = time.monotonic()
            if stage != self.stage:
                self.stage, self.stage_since = stage, now
            if step is not None:
                self.step = step
                if stage == "denoising":
                    self.step_times.setdefault(step, now)
            return self._figures(now)

    def now(self) -> dict[str, Any]:
        """The figures of the stage last reported, as they stand now (the ticker's)."""
        with self._lock:
            return self._figures(time.monotonic())

    def _figures(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"elapsed_s": round(now - self.started, 3)}
        rate = self._rate(now)
        if rate is not None:
            out["rate"] = round(rate, 3)
        left, whole = self._left(now, rate)
        if left is not None:
            out["eta_s"] = round(left, 3)
        if left is not None and whole:
            done = self.waited_s + (now - self.started)
            self._fraction = max(self._fraction, min(FRACTION_MAX, done / max(done + left, 1e-9)))
            out["fraction"] = round(self._fraction, 4)
        if self.preview_step is not None:
            out["preview_step"] = self.preview_step
        return out

    def _rate(self, now: float) -> float | None:
        step = self.step or 0
        if self.stage != "denoising" or step < 2:
            return None
        # over the later half of the steps so far: it follows a machine that speeds up or slows down, and
        # skips the first step's warm-up
        since = max(1, step // 2)
        return (step - since) / max(self.step_times.get(step, now) - self.step_times.get(since, now), 1e-9)

    def _left(self, now: float, rate: float | None) -> tuple[float | None, bool]:
        """Seconds left (None: nothing to go by), and whether they count every stage to come: before this
        worker's first decode, a denoising job's ETA is its steps alone, and it has no fraction."""
        e = self.expected
        in_stage = now - self.stage_since
        post = None if e["decode"] is None or e["encode"] is None else e["decode"] + e["encode"]
        if self.stage == "encoding":
            return (None, False) if e["encode"] is None else (max(0.0, e["encode"] - in_stage), True)
        if self.stage == "decoding":
            return (None, False) if post is None else (max(0.0, e["decode"] - in_stage) + e["encode"], True)
        if self.stage != "denoising":
            return None, False  # loading: its length is not this worker's per-pixel pace
        step = self.step or 0
        if step >= self.total:
            steps_left: float | None = 0.0
        elif rate is not None:
            steps_left = (self.total - step) / rate
        elif e["denoise"] is None:
            steps_left = None
        else:
            per_step = e["denoise"] / max(self.total, 1)
            steps_left = (self.total - step) * per_step
            if step == 0:  # the text encoding and the first step, under way
                steps_left = max(0.0, (e["text"] or 0.0) + per_step - in_stage) + (self.total - 1) * per_step
        if steps_left is None:
            return None, False
        return steps_left + (post or 0.0), post is not None
