"""The embedded default started from a thread that then ends (a widget's callback, an executor's worker):
its local Ray must outlive that thread. Ray's processes die with the thread that forked them
(PR_SET_PDEATHSIG), so `pool.connect` starts a local Ray on a thread that lasts as long as the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mochi_lab.pool.connection import slow_local_start

SCRIPT = r"""
import json, os, threading, time

import psutil
import ray

from mochi_lab import MochiCluster

started = threading.Thread(target=lambda: MochiCluster(persistent=False, start_pool=False).close())
started.start()
started.join()
deadline = time.monotonic() + 60
while os.path.exists(f"/proc/self/task/{started.native_id}"):  # the thread's end, as the kernel sees it
    assert time.monotonic() < deadline
    time.sleep(0.05)
ray_procs = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
alive = {p.name(): p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_procs}
answer = ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=120) if all(alive.values()) else None
print(json.dumps({"alive": alive, "answer": answer}))
"""


@pytest.mark.usefixtures("ray_local")
def test_a_local_ray_started_from_a_short_lived_thread_outlives_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "MOCHI_LAB_GATEWAY")}
    env.update(MOCHI_LAB_DATA_DIR=str(tmp_path / "data"), MOCHI_LAB_NAMESPACE=f"owner-{tmp_path.name}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"alive": {"gcs_server": True, "raylet": True}, "answer": 42}, proc.stderr[-2000:]


@pytest.mark.parametrize(("message", "slow"), [
    ("The current node timed out during startup. This could happen because some of the raylet failed to "
     "startup or the GCS has become overloaded.", True),
    ("GCS cannot find the node with node ID 1a2b. The node registration may not be complete yet before the "
     "timeout. Try increase the RAY_raylet_start_wait_time_s config.", True),
    ("Failed to start the raylet: address already in use", False),
])
def test_only_a_registration_wait_running_out_earns_a_local_start_its_second_try(message, slow):
    assert slow_local_start(Exception(message)) is slow
