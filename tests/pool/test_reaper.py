"""A SIGKILLed owner of the embedded local Ray (`persistent=False`: today's in-process Ray) leaves no Ray
process behind (checked by pid), and no runtime record."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mochi_lab.pool.reaper import started
from tests.support.faults_helpers import alive

CHILD = """
import os, sys, time
from mochi_lab import MochiCluster, Settings
import ray
cluster = MochiCluster(settings=Settings(data_dir=sys.argv[1], cache_dir=sys.argv[2], workers=1, namespace="reaper"),
                       persistent=False)
cluster.wait_ready(timeout=300)
assert not os.path.exists(os.path.join(sys.argv[1], "runtime.json")), "persistent=False recorded a runtime"
print(ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


def _session(session_dir: str) -> dict[int, tuple[float, str]]:
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if session_dir in cmdline:
            found[p.pid] = (started(p.pid), cmdline)
    return found


@pytest.mark.usefixtures("fault_injection")
def test_a_sigkilled_owner_leaves_no_ray_process_behind(tmp_path, tiny_checkpoint):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(tiny_checkpoint.parent)],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        session_dir = child.stdout.readline().strip()
        assert session_dir.startswith("/"), "the child did not start its local Ray"
        before = _session(session_dir)
        kinds = " ".join(cmd for _, cmd in before.values())
        assert "raylet" in kinds and "agent" in kinds, kinds  # the agents that used to leak are there
        owned = {c.pid: started(c.pid) for c in psutil.Process(child.pid).children(recursive=True)}
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [pid for pid, (created, _) in before.items() if alive(pid, created)]
            left += [pid for pid, created in owned.items() if alive(pid, created) and pid not in left]
            if not left:
                break
            time.sleep(0.5)
        print(f"\nreaper: {len(before)} session processes, {len(left)} left after the owner's SIGKILL")
        assert not left, [psutil.Process(p).cmdline() for p in left if psutil.pid_exists(p)]
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
