"""Test gates: a job held at a chosen stage or denoising step until a test releases it.

Off unless `Settings.test_gates` names a folder (MOCHI_LAB_TEST_GATES); no deployment sets it. A test
writes `<folder>/<key>.hold` (key: a digest of the job's prompt) naming a stage and optionally a step. A
worker whose job has that prompt records `<key>.<job id>.reached` on getting there, then waits until the
hold file is gone or names another stage or step (where the job is held next), the job is cancelled, its
lease is lost or the worker stops. Files rather than the store: they work the same for every store and every
process on one machine (Ray workers included).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

STAGES = ("loading", "denoising", "decoding", "encoding")


def gate_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def hold_file(root: Path, prompt: str) -> Path:
    return Path(root) / f"{gate_key(prompt)}.hold"


def reached_files(root: Path, prompt: str) -> list[Path]:
    return sorted(Path(root).glob(f"{gate_key(prompt)}.*.reached"))


def write_hold(root: Path, prompt: str, stage: str, step: int | None = None) -> Path:
    """Hold the jobs with this prompt where they reach `stage` (and `step`, for denoising)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    path = hold_file(root, prompt)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "step": step}))
    tmp.replace(path)  # a worker never reads half a hold
    return path


class Gates:
    """The worker's side: `at()` is called with every progress update of a running job."""

    poll_s = 0.01

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root else None

    def at(self, job_id: str, prompt: str, stage: str, step: int | None,
           released: Callable[[], bool], waiting: Callable[[], None] = lambda: None) -> None:
        """Wait here while a hold matches; `released()` ends the wait early (cancel, lost lease, stop),
        `waiting()` runs each poll (a held job is alive, not wedged)."""
        if self.root is None:
            return
        hold = hold_file(self.root, prompt)
        want = _read(hold)
        if want is None:
            return
        if want.get("stage") != stage or want.get("step") not in (None, step):
            return
        reached = hold.with_name(f"{gate_key(prompt)}.{job_id}.reached")
        reached.write_text(json.dumps({"stage": stage, "step": step, "at": time.time()}))
        stopped = threading.Event()
        # A hold rewritten for a later stage or step moves the job on to it: one job, held at two places.
        while _read(hold) == want and not released():
            waiting()
            stopped.wait(self.poll_s)


def _read(hold: Path) -> dict | None:
    """The hold's {"stage", "step"}; None once it is gone (write_hold replaces it whole: never half read)."""
    try:
        return json.loads(hold.read_text())
    except (FileNotFoundError, ValueError):
        return None
