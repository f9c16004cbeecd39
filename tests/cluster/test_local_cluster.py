"""The local cluster end to end: cluster/local/up.sh (Redis, a Ray head, two Ray worker nodes
with one logical GPU each, all on loopback), a mochi_lab job through MochiCluster, then
cluster/local/down.sh, which must leave none of the processes behind.

The only heavy test of tests/cluster (a few minutes on two busy cores)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import av
import psutil
import pytest
import redis

from tests.support import clusterlib as cl
from tests.support.local_cluster import WORKERS, alive, group_pids, logs, marked_pids, pick_ports, read_env
from tests.support.rayenv import clean_env

UP = cl.CLUSTER / "local" / "up.sh"
DOWN = cl.CLUSTER / "local" / "down.sh"
GPUS_PER_WORKER = 1  # two actors, one on each worker node: the head runs none

DRIVER = textwrap.dedent(
    """
    import json, sys
    import av
    from mochi_lab import MochiCluster

    address, redis_url = sys.argv[1], sys.argv[2]
    cluster = MochiCluster(address=address, redis_url=redis_url)
    job = cluster.generate("a red ball", num_frames=7, height=32, width=32, num_inference_steps=2, seed=1)
    path = job.result(timeout=300)
    with av.open(str(path)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    import ray
    rows = [dict(r) for r in cluster.workers()]
    print("RESULT " + json.dumps({
        "path": str(path), "frames": frames, "status": str(job.status), "job_id": job.id,
        "workers": [{"worker_id": r.get("worker_id"), "node_id": r.get("node_id"), "node": r.get("node")} for r in rows],
        "ray_nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]],
    }, default=str))
    """
)

# A notebook on Kubernetes joins through Ray Client (ray://): it must re-attach to the job and the pool.
REATTACH = textwrap.dedent(
    """
    import json, sys
    from mochi_lab import MochiCluster

    cluster = MochiCluster(address=sys.argv[1], redis_url=sys.argv[2])
    job = cluster.job(sys.argv[3])
    print("RESULT " + json.dumps({
        "path": str(job.result(timeout=60)), "status": job.status,
        "actors": sorted(cluster.backend.pool.handles()), "workers": sorted(w["worker_id"] for w in cluster.workers()),
    }))
    """
)


# The Ray Client server on the head (a proxy) starts a "specific server" process per client
# connection: `python setup_worker.py` -> bash -> `python -m ray.util.client.server`, which
# imports Ray twice before it listens. On two cores with the cluster and other tests running
# that takes 15-25 s, close to the proxy's fixed 30 s wait for it
# (RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S, which up.sh raises); when the start fails, the
# client gets "Starting Ray client server failed" / "Proxy failed to Connect to backend" before
# anything of mochi_lab ran. Such a failure is retried, a bounded number of times; any other
# failure, or a result that differs, fails the test at once.
REATTACH_ATTEMPTS = 3
CLIENT_START_FAILURES = ("Starting Ray client server failed", "Proxy failed to Connect to backend")


def _reattach(info: dict, job_id: str, env: dict) -> subprocess.CompletedProcess:
    for attempt in range(1, REATTACH_ATTEMPTS + 1):
        again = subprocess.run(
            [sys.executable, "-c", REATTACH, info["ray_client_address"], info["redis_url"], job_id],
            capture_output=True, text=True, timeout=240, env=env, cwd=cl.REPO,
        )
        output = again.stdout + again.stderr
        if again.returncode == 0 or not any(m in output for m in CLIENT_START_FAILURES):
            return again
        print(f"Ray Client connection failed to start (attempt {attempt} of {REATTACH_ATTEMPTS}); retrying")
    return again


@pytest.mark.usefixtures("cluster_scripts", "redis_server")
@pytest.mark.timeout(1500)
def test_local_cluster_runs_a_job_end_to_end_and_stops_cleanly():
    ray_port, redis_port = pick_ports()
    state = Path(tempfile.mkdtemp(prefix="mochi-lc-", dir="/tmp"))  # short: Ray's socket paths
    env = clean_env("RAY_", "REDIS_", "MOCHI_")
    env["PYTHON"] = sys.executable
    pids: set[int] = set()
    pgids: list[int] = []
    redis_pid = None
    try:
        try:
            up = subprocess.run(
                ["bash", str(UP), "--state-dir", str(state), "--ray-port", str(ray_port), "--redis-port", str(redis_port),
                 "--workers", str(WORKERS), "--gpus-per-worker", str(GPUS_PER_WORKER), "--cpus-per-worker", "2"],
                capture_output=True, text=True, timeout=600, env=env,
            )
            assert up.returncode == 0, up.stdout + up.stderr + logs(state)
            info = json.loads((state / "cluster.json").read_text())
            pgids = list(info["process_groups"].values())
            redis_pid = info["redis_pid"]
            for g in pgids:
                pids |= group_pids(g)
            pids.add(redis_pid)

            # --- what up.sh promised -----------------------------------------------------------------
            assert info["ray_port"] == ray_port and info["ray_port"] != 6379
            assert set(info["process_groups"]) == {"head", *(f"worker-{i}" for i in range(1, WORKERS + 1))}
            nodes = info["nodes"]
            assert len(nodes) == WORKERS + 1
            for node in nodes:  # no node advertises a non-loopback address
                assert ipaddress.ip_address(node["address"]).is_loopback, node
            assert sorted(n["GPU"] for n in nodes) == [0] + [GPUS_PER_WORKER] * WORKERS
            assert [n["CPU"] for n in nodes if n["head"]] == [0]

            cluster_env = read_env(state / "env")
            assert cluster_env["RAY_ADDRESS"] == info["ray_address"] == f"127.0.0.2:{ray_port}"
            assert cluster_env["MOCHI_LAB_WORKERS"] == str(WORKERS * GPUS_PER_WORKER)
            r = redis.Redis.from_url(cluster_env["REDIS_URL"])
            assert r.ping()
            assert r.config_get("appendonly")["appendonly"] == "yes"
            assert r.config_get("bind")["bind"] == "127.0.0.1"
            assert r.config_get("port")["port"] == str(redis_port)
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=redis_port).ping()
            r.close()

            # --- a job through the public handle ----------------------------------------------------
            driver_env = {**env, **{k: v for k, v in cluster_env.items() if k not in ("RAY_ADDRESS", "REDIS_URL")}}
            # never the user's cache: the session's test cache when tests/conftest.py set one
            driver_env["MOCHI_LAB_CACHE_DIR"] = os.environ.get("MOCHI_LAB_CACHE_DIR") or str(state / "cache")
            run = subprocess.run(
                [sys.executable, "-c", DRIVER, info["ray_address"], info["redis_url"]],
                capture_output=True, text=True, timeout=540, env=driver_env, cwd=cl.REPO,
            )
            result_lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            assert run.returncode == 0 and result_lines, run.stdout[-3000:] + run.stderr[-5000:] + logs(state)
            result = json.loads(result_lines[-1][len("RESULT "):])
            video = Path(result["path"])
            assert video.is_file() and video.suffix == ".mp4"
            assert video.is_relative_to(state / "data")  # MOCHI_LAB_DATA_DIR from STATE_DIR/env
            with av.open(str(video)) as f:
                assert sum(1 for _ in f.decode(video=0)) == 7
            assert result["frames"] == 7
            head_ids = {n["node_id"] for n in nodes if n["head"]}
            assert result["workers"], result
            assert not {w["node_id"] for w in result["workers"]} & head_ids  # the head runs no actor
            assert all(ipaddress.ip_address(a).is_loopback for a in result["ray_nodes"])

            # --- a second client, through Ray Client, re-attaches by id and starts nothing new ----------
            again = _reattach(info, result["job_id"], driver_env)
            lines = [line for line in again.stdout.splitlines() if line.startswith("RESULT ")]
            assert again.returncode == 0 and lines, again.stdout[-3000:] + again.stderr[-5000:]
            reattached = json.loads(lines[-1][len("RESULT "):])
            assert reattached["path"] == result["path"] and reattached["status"] == "done"
            # the same pool, one actor per logical GPU, found by name: none added by the second client
            assert reattached["actors"] == [f"mochi-worker-{i}" for i in range(WORKERS * GPUS_PER_WORKER)]
            assert {w["worker_id"] for w in result["workers"]} <= set(reattached["workers"]) <= set(reattached["actors"])

            # --- traffic stayed on loopback ----------------------------------------------------------
            for g in pgids:
                pids |= group_pids(g)
            actors = marked_pids(state) - pids
            assert actors, "worker actor processes (own process groups, marked by up.sh)"
            pids |= actors
            for pid in pids:
                try:
                    conns = psutil.Process(pid).net_connections(kind="inet")
                except psutil.NoSuchProcess:
                    continue
                for c in conns:
                    if c.raddr:
                        addr = ipaddress.ip_address(c.raddr.ip)
                        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                            addr = addr.ipv4_mapped
                        assert addr.is_loopback, (pid, c)
        finally:
            down = subprocess.run(["bash", str(DOWN), "--state-dir", str(state), "--grace", "5"],
                                  capture_output=True, text=True, timeout=300, env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        # everything it started is gone: each process group is empty, Redis is down
        left = {pid for pid in pids if alive(pid)}
        for g in pgids:
            left |= {pid for pid in group_pids(g) if alive(pid)}
        left |= {pid for pid in marked_pids(state) if alive(pid)}
        assert not left, [psutil.Process(p).cmdline() for p in left if psutil.pid_exists(p)]
        assert redis_pid is None or not alive(redis_pid)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", redis_port)) != 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.2", ray_port)) != 0
        # idempotent
        again = subprocess.run(["bash", str(DOWN), "--state-dir", str(state)], capture_output=True, text=True,
                               timeout=120, env=env)
        assert again.returncode == 0, again.stderr
        assert not (state / "env").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)
