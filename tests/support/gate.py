"""Holding a job where a test needs it (mochi_lab.worker.gate): the worker waits at the gate until released.

    with hold("a cat, held", "denoising", step=1) as gate:
        job = cluster.generate("a cat, held", **TINY)
        gate.wait_reached()       # the job is at denoising step 1, and stays there
        ...                       # act on a running job: cancel it, read its preview, see the worker busy
    # leaving the block releases it

A new Gate for the same prompt moves a held job on: it leaves its gate and is held at the new one.

The session's gate folder is MOCHI_LAB_TEST_GATES (tests/conftest.py sets it before any worker starts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mochi_lab.worker.gate import hold_file, reached_files, write_hold


class Gate:
    """A hold on every job with `prompt`, at `stage` (and `step`)."""

    def __init__(self, prompt: str, stage: str = "denoising", step: int | None = 1,
                 root: Path | None = None) -> None:
        self.root = Path(root or os.environ["MOCHI_LAB_TEST_GATES"])
        self.prompt, self.stage, self.step = prompt, stage, step
        for old in reached_files(self.root, prompt):
            old.unlink()
        write_hold(self.root, prompt, stage, step)

    def reached(self) -> list[str]:
        """The ids of the jobs that reached the gate (held there until release)."""
        return [p.name.split(".")[1] for p in reached_files(self.root, self.prompt)]

    def wait_reached(self, count: int = 1, timeout: float = 120.0) -> list[str]:
        """Wait until `count` jobs are at the gate; their ids."""
        deadline = time.monotonic() + timeout
        while len(ids := self.reached()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(ids)} of {count} job(s) reached the gate {self.stage}"
                                     f"{'' if self.step is None else f' step {self.step}'} within {timeout} s")
            time.sleep(0.01)
        return ids

    def release(self) -> None:
        hold_file(self.root, self.prompt).unlink(missing_ok=True)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
