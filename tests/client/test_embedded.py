"""The embedded default (`persistent=False`: a Ray inside the process) on a laptop: every listening socket of
the process and of its Ray is on loopback, and the data dir it makes is private (0700, files 0600), a real
job's video and thumbnail included; its raylet has longer than Ray's 30 s to register. The kernel imports
Ray before mochi_lab, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset, as a notebook may."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from mochi_lab.pool.connection import RAYLET_REGISTRATION_WAIT_S
from mochi_lab.video import probe
from tests.support.faults_helpers import is_loopback, listening

KERNEL = """
import json, sys
import ray
from mochi_lab import MochiCluster
c = MochiCluster(persistent=False)
job = c.generate("a private fox", seed=4, **json.loads(sys.argv[1]))
print(json.dumps({"path": str(job.result(300))}), flush=True)
sys.stdin.readline()  # the test looks at this process and its Ray meanwhile
"""


@pytest.mark.usefixtures("ray_local")
def test_the_embedded_default_listens_on_loopback_only_and_keeps_its_files_private(tmp_path, tiny_checkpoint, tiny):
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(MOCHI_LAB_DATA_DIR=str(data), MOCHI_LAB_WORKERS="1", MOCHI_LAB_PERSISTENT="0")
    with open(tmp_path / "kernel.err", "w") as err:
        kernel = subprocess.Popen([sys.executable, "-c", KERNEL, json.dumps(tiny)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    try:
        line = kernel.stdout.readline()
        assert line, (tmp_path / "kernel.err").read_text()[-3000:]
        video = json.loads(line)["path"]
        assert probe(video).frames == tiny["num_frames"]
        me = psutil.Process(kernel.pid)
        family = [me, *me.children(recursive=True)]
        sockets = listening(family)
        assert {p.name() for p in family if p.pid in {pid for pid, _, _ in sockets}} >= {"gcs_server", "raylet"}
        assert [s for s in sockets if not is_loopback(s[1])] == []
        # The driver's wait for its raylet, lengthened before ray.init, which the raylet inherits
        raylet = next(p for p in family if p.name() == "raylet")
        assert raylet.environ().get("RAY_raylet_start_wait_time_s") == str(RAYLET_REGISTRATION_WAIT_S)

        modes = {p.relative_to(data).as_posix(): p.stat().st_mode & 0o777 for p in [data, *data.rglob("*")]}
        video = os.path.relpath(video, data)
        assert {".", "store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm", "artifacts", "artifacts/alice", video,
                video.replace(".mp4", ".png")} <= set(modes)
        assert {name: oct(mode) for name, mode in modes.items()
                if mode != (0o700 if (data / name).is_dir() else 0o600)} == {}
    finally:
        os.killpg(kernel.pid, signal.SIGKILL)  # its reaper ends the rest of its Ray
        kernel.wait()
