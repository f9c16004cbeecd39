"""The production topology on one machine, end to end: `cluster/local/up.sh --gateway` (Redis, a Ray head
and two Ray worker nodes with one logical GPU each, a JupyterHub, the gateway as the hub's service and the
pool's owner), all on loopback. A "notebook" process that holds only what a notebook pod holds
(MOCHI_LAB_GATEWAY and a hub token) makes a video with MochiCluster() through the gateway; a second client
re-attaches to that job and the pool through Ray Client, as a gateway on Kubernetes does; an admin's token
resizes the pool with cluster/scripts/scale-workers.sh (kubectl stood in for, the gateway real); then
cluster/local/down.sh, which must leave none of the processes behind.

One cluster for all of it: each start of up.sh and down.sh costs a Ray, a Redis and a hub."""

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
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import av
import psutil
import pytest
import redis

from tests.support import clusterlib as cl
from tests.support.fake_kubectl import FAKE_KUBECTL
from tests.support.local_cluster import WORKERS, alive, group_pids, logs, marked_pids, pick_ports, read_env
from tests.support.rayenv import clean_env

UP = cl.CLUSTER / "local" / "up.sh"
DOWN = cl.CLUSTER / "local" / "down.sh"
GPUS_PER_WORKER = 1  # two actors, one on each worker node: the head runs none

# What a notebook pod holds: the gateway's address and a hub token, no Redis URL, no Ray address, no volume.
NOTEBOOK = textwrap.dedent(
    """
    import json, os
    import av
    from mochi_lab import MochiCluster

    leaked = sorted(k for k in os.environ if k.startswith(("REDIS", "RAY_")))
    cluster = MochiCluster()
    job = cluster.generate("a red ball", num_frames=7, height=32, width=32, num_inference_steps=2, seed=1)
    path = job.result(timeout=400)
    with av.open(str(path)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    print("RESULT " + json.dumps({"backend": type(cluster.backend).__name__, "path": str(path), "frames": frames,
                                  "job_id": job.id, "leaked": leaked}))
    """
)

# A gateway on Kubernetes joins through Ray Client (ray://): it must re-attach to the job and the pool.
REATTACH = textwrap.dedent(
    """
    import json, sys
    import ray
    from mochi_lab import MochiCluster

    cluster = MochiCluster(address=sys.argv[1], redis_url=sys.argv[2])
    job = cluster.job(sys.argv[3])
    print("RESULT " + json.dumps({
        "path": str(job.result(timeout=60)), "status": job.status,
        "actors": sorted(cluster.backend.pool.handles()),
        "workers": [{"worker_id": r.get("worker_id"), "node_id": r.get("node_id")} for r in cluster.workers()],
        "ray_nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]],
    }, default=str))
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


def _client_logs(state: Path) -> str:
    """The tails of the Ray Client proxy's and its specific servers' logs: why a connection did not start."""
    logs_dir = state / "ray" / "session_latest" / "logs"
    return "\n".join(f"--- {p.name}:\n" + p.read_text(errors="replace")[-2000:]
                     for p in sorted(logs_dir.glob("ray_client_server*")))


def _reattach(info: dict, job_id: str, env: dict, state: Path) -> subprocess.CompletedProcess:
    for attempt in range(1, REATTACH_ATTEMPTS + 1):
        again = subprocess.run(
            [sys.executable, "-c", REATTACH, info["ray_client_address"], info["redis_url"], job_id],
            capture_output=True, text=True, timeout=240, env=env, cwd=cl.REPO,
        )
        output = again.stdout + again.stderr
        if again.returncode == 0 or not any(m in output for m in CLIENT_START_FAILURES):
            return again
        # a warning, not a print: the run's summary shows it though the test passes, and with it the cause
        warnings.warn(f"Ray Client connection failed to start (attempt {attempt} of {REATTACH_ATTEMPTS}); retried\n"
                      f"{output[-2000:]}\n{_client_logs(state)}", stacklevel=1)
    return again


def _result(run: subprocess.CompletedProcess, state: Path) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:] + logs(state)
    return json.loads(lines[-1][len("RESULT "):])


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.usefixtures("cluster_scripts", "redis_server")
@pytest.mark.timeout(1500)
def test_a_hub_token_gets_a_video_through_the_gateway_a_ray_client_reattaches_and_down_leaves_nothing(tmp_path):
    ray_port, redis_port, port_base = pick_ports()
    state = Path(tempfile.mkdtemp(prefix="mochi-lc-", dir="/tmp"))  # short: Ray's socket paths
    env = clean_env("RAY_", "REDIS_", "MOCHI_", "JUPYTERHUB_")
    env["PYTHON"] = sys.executable
    # never the user's cache: the session's test cache when tests/conftest.py set one
    cache = os.environ.get("MOCHI_LAB_CACHE_DIR") or str(state / "cache")
    pids: set[int] = set()
    pgids: list[int] = []
    redis_pid = None
    try:
        try:
            up = subprocess.run(
                ["bash", str(UP), "--gateway", "--state-dir", str(state), "--ray-port", str(ray_port),
                 "--port-base", str(port_base), "--redis-port", str(redis_port), "--workers", str(WORKERS),
                 "--gpus-per-worker", str(GPUS_PER_WORKER), "--cpus-per-worker", "2"],
                capture_output=True, text=True, timeout=900, env={**env, "MOCHI_LAB_CACHE_DIR": cache},
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
            workers = {f"worker-{i}" for i in range(1, WORKERS + 1)}
            assert set(info["process_groups"]) == {"head", "hub", "gateway", *workers}
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
            notebook_env = read_env(state / "notebook.env")
            assert set(notebook_env) == {"MOCHI_LAB_GATEWAY", "JUPYTERHUB_API_TOKEN"}
            gateway = notebook_env["MOCHI_LAB_GATEWAY"]
            assert gateway == info["gateway_url"]

            # --- the notebook: a hub token and the gateway's address, nothing else -------------------
            nb_env = {"PATH": env["PATH"], "HOME": str(tmp_path), "MOCHI_LAB_CACHE_DIR": str(tmp_path / "downloads"),
                      **notebook_env}
            result = _result(subprocess.run([sys.executable, "-c", NOTEBOOK], capture_output=True, text=True,
                                            timeout=600, env=nb_env, cwd=cl.REPO), state)
            assert result["backend"] == "GatewayBackend" and result["leaked"] == []
            assert result["frames"] == 7
            video = Path(result["path"])
            assert video.is_relative_to(tmp_path / "downloads")  # downloaded through the gateway
            with av.open(str(video)) as f:
                assert sum(1 for _ in f.decode(video=0)) == 7
            # the same bytes over HTTP with the token, nothing without it
            token = notebook_env["JUPYTERHUB_API_TOKEN"]
            assert _get(f"{gateway}download/{result['job_id']}", None)[0] == 401
            code, body = _get(f"{gateway}download/{result['job_id']}", token)
            assert code == 200 and body == video.read_bytes()

            # --- a Ray Client re-attaches to the job by id and to the gateway's pool, adding nothing ---------
            driver_env = {**env, **{k: v for k, v in cluster_env.items() if k not in ("RAY_ADDRESS", "REDIS_URL")},
                          "MOCHI_LAB_CACHE_DIR": cache, "JUPYTERHUB_USER": "user"}  # the job's account: the hub's user
            again = _reattach(info, result["job_id"], driver_env, state)
            reattached = _result(again, state)
            assert reattached["status"] == "done"
            artifact = Path(reattached["path"])
            assert artifact.is_relative_to(state / "data")  # MOCHI_LAB_DATA_DIR from STATE_DIR/env
            assert artifact.read_bytes() == body
            # the same pool, one actor per logical GPU, found by name; the head runs none
            assert reattached["actors"] == [f"mochi-worker-{i}" for i in range(WORKERS * GPUS_PER_WORKER)]
            assert {w["worker_id"] for w in reattached["workers"]} <= set(reattached["actors"])
            head_ids = {n["node_id"] for n in nodes if n["head"]}
            assert reattached["workers"] and not {w["node_id"] for w in reattached["workers"]} & head_ids
            assert all(ipaddress.ip_address(a).is_loopback for a in reattached["ray_nodes"])

            # --- the pool's owner resizes it for an admin, and only for an admin ----------------------
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            (bin_dir / "kubectl").write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
            (bin_dir / "kubectl").chmod(0o755)
            ops_env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_KUBECTL_STATE": str(tmp_path)}
            scale = ["bash", str(cl.CLUSTER / "scripts" / "scale-workers.sh"), "--url", gateway]
            out = subprocess.run([*scale, "--token-file", str(state / "admin_token"), str(WORKERS)], env=ops_env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout + out.stderr + (state / "logs" / "gateway.log").read_text()[-3000:]
            out = subprocess.run([*scale, str(WORKERS)], env={**ops_env, "MOCHI_LAB_ADMIN_TOKEN": token},
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode != 0 and "403" in out.stdout + out.stderr

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
        assert not (state / "notebook.env").exists() and not (state / "admin_token").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)
