"""What a worker reports about itself in its row: its device, its GPU as NVML sees it, its stage-time
histograms and job counts (mochi_lab.pool.metrics exports them), and the versions a job's provenance names."""

from __future__ import annotations

import logging
from typing import Any

from mochi_lab.config import cuda_device_index
from mochi_lab.version import __version__

log = logging.getLogger("mochi_lab.worker")


def gpu_facts() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_name": None, "gpu_memory_total": None}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu_name": props.name, "gpu_memory_total": props.total_memory}


class NvmlSampler:
    """This worker's GPU as NVML sees it (utilisation, device memory, power), for its row. Absent, not
    faked, where there is no GPU or no NVML: `sample()` is then {}."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml
            import torch

            if not torch.cuda.is_available():
                return
            pynvml.nvmlInit()
            uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
            # the device torch calls 0 is the one Ray gave this actor (CUDA_VISIBLE_DEVICES)
            self.handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None else
                           pynvml.nvmlDeviceGetHandleByIndex(cuda_device_index()))
            self.nvml = pynvml
        except Exception as exc:  # no driver, no library, an odd CUDA_VISIBLE_DEVICES: no GPU figures
            log.info("no NVML figures: %r", exc)
            self.handle = None

    def sample(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        nv, h = self.nvml, self.handle
        out: dict[str, float] = {}
        try:
            out["gpu_utilization"] = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out["gpu_device_memory_used"], out["gpu_device_memory_total"] = mem.used, mem.total
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception as exc:  # e.g. power not supported on this board: keep what was read
            log.debug("NVML read: %r", exc)
        return out


# Stage-time histograms kept by each worker and reported in its row (mochi_lab.pool.metrics exports them):
# upper bounds in seconds, from a tiny job's milliseconds to Genmo's reference video's minutes.
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STAGES = ("queue", "load", "text", "denoise", "decode", "encode")


class WorkerStats:
    """Cumulative figures of one worker's life (they restart from zero with it, as Prometheus counters
    do): jobs finished per model and outcome, stage-time histograms, denoising steps and seconds, the
    last job's steps per second, and store errors."""

    def __init__(self) -> None:
        self.finished: dict[str, dict[str, int]] = {}
        self.stages = {name: {"count": 0, "sum": 0.0, "buckets": [0] * len(STAGE_BUCKETS_S)} for name in STAGES}
        self.steps = 0
        self.denoise_s = 0.0
        self.rate: float | None = None
        self.store_errors = 0

    def job_finished(self, model: str, outcome: str, timings: dict[str, float], steps: int) -> None:
        by_model = self.finished.setdefault(model, {})
        by_model[outcome] = by_model.get(outcome, 0) + 1
        for name in STAGES:
            seconds = timings.get(f"{name}_s")
            if seconds is None:
                continue
            stage = self.stages[name]
            stage["count"] += 1
            stage["sum"] += seconds
            # each bucket counts its own observations, (previous bound, bound]; metrics accumulates them
            for i, bound in enumerate(STAGE_BUCKETS_S):
                if seconds <= bound:
                    stage["buckets"][i] += 1
                    break
        if outcome == "done" and timings.get("denoise_s"):
            self.steps += steps
            self.denoise_s += timings["denoise_s"]
            self.rate = steps / timings["denoise_s"]

    def to_dict(self) -> dict[str, Any]:
        return {"finished": self.finished, "stages": self.stages, "buckets": list(STAGE_BUCKETS_S),
                "steps": self.steps, "denoise_s": self.denoise_s, "rate": self.rate,
                "store_errors": self.store_errors}


def versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"mochi_lab": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
