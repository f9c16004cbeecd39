"""A notebook-like client that queues a sweep and then hangs, so a test can SIGKILL it mid-sweep.

usage: python -m tests.support.sweep_client SETTINGS_JSON EXPERIMENT QUEUE_BEFORE_HANG
Prints "queued <n> <job id>" after each job it queues; before the next one it sleeps forever.
It only submits (a handle on the store, no Ray, no pool): the test session's workers run its jobs.
"""

from __future__ import annotations

import json
import sys
import time

from mochi_lab import MochiCluster
from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import Settings
from mochi_lab.store import open_store
from tests.support.jobkit import TINY

PROMPTS = ["a kite over a hill", "a train in the rain"]
SEEDS = [1, 2, 3]


def main() -> None:
    settings = Settings(**json.loads(sys.argv[1]))
    name, hang_after = sys.argv[2], int(sys.argv[3])
    store = open_store(settings.store_url)
    cluster = MochiCluster(backend=DirectBackend(settings, store))
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
