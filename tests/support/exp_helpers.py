"""Helpers shared by the experiment tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import Settings
from mochi_lab.model import artifact_path
from mochi_lab.store import Store


def backend(store: Store, account: str = "alice") -> DirectBackend:
    """One account's direct backend on `store`, with no pool (the tests play the workers)."""
    return DirectBackend(Settings.from_env(account=account), store)


def finish(store: Store, outcome: str, *, video: Path | None = None) -> str:
    """Act as a worker through the store contract: claim the next job and end it with `outcome`."""
    claim = store.claim("test-worker", 30.0)
    assert claim is not None, "nothing to claim"
    job = claim.job
    if outcome == "done":
        artifacts = {}
        if video:  # where a worker writes it: derived from the account and the job id
            dest = artifact_path(Settings.from_env().artifacts_dir, job.account, job.id, "video")
            dest.parent.mkdir(parents=True, exist_ok=True)
            artifacts["video"] = str(shutil.copyfile(video, dest))
        store.complete(job.id, claim.token, artifacts=artifacts,
                       timings={"queue_s": 0.1, "denoise_s": 0.5, "run_s": 1.0}, meta={"seed": job.params["seed"]})
    elif outcome == "failed":
        store.fail(job.id, claim.token, error="RuntimeError: boom", traceback="Traceback ...")
    elif outcome == "running":
        pass
    else:
        raise ValueError(outcome)
    return job.id
