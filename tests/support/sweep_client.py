"""A notebook-like client that queues a sweep and then hangs, so a test can SIGKILL it mid-sweep.

usage: python sweep_client.py SETTINGS_JSON EXPERIMENT QUEUE_BEFORE_HANG
Prints "queued <n> <job id>" after each job it queues; before the next one it sleeps forever.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from mochi_lab import MochiCluster  # noqa: E402
from mochi_lab.settings import Settings  # noqa: E402

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}
PROMPTS = ["a kite over a hill", "a train in the rain"]
SEEDS = [1, 2, 3]


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    name, hang_after = sys.argv[2], int(sys.argv[3])
    cluster = MochiCluster(settings=settings, start_pool=False)
    store = cluster.backend.store
    enqueue = store.enqueue
    queued = 0

    def slow_enqueue(*args, **kwargs):
        nonlocal queued
        if queued == hang_after:
            print("hanging", flush=True)
            time.sleep(3600)  # the test kills us here, with the rest of the sweep unqueued
        record = enqueue(*args, **kwargs)
        queued += 1
        print(f"queued {queued} {record.id}", flush=True)
        return record

    store.enqueue = slow_enqueue  # type: ignore[method-assign]
    exp = cluster.experiment(name, description="killed mid-sweep", tags=["resume-test"])
    exp.sweep(PROMPTS, SEEDS, **TINY)


if __name__ == "__main__":
    main()
