"""Helpers shared by the experiment tests."""

from __future__ import annotations

from pathlib import Path

from mochi_lab.store import Store


def finish(store: Store, outcome: str, *, video: Path | None = None) -> str:
    """Act as a worker through the store contract: claim the next job and end it with `outcome`."""
    claim = store.claim("test-worker", 30.0)
    assert claim is not None, "nothing to claim"
    if outcome == "done":
        artifacts = {"video": str(video)} if video else {}
        store.complete(claim.job.id, claim.token, artifacts=artifacts,
                       timings={"queue_s": 0.1, "denoise_s": 0.5, "run_s": 1.0},
                       meta={"seed": claim.job.params["seed"]})
    elif outcome == "failed":
        store.fail(claim.job.id, claim.token, error="RuntimeError: boom", traceback="Traceback ...")
    elif outcome == "running":
        pass
    else:
        raise ValueError(outcome)
    return claim.job.id
