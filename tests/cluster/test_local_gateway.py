"""The production topology on one machine, end to end: `cluster/local/up.sh --gateway` (Redis, Ray,
a JupyterHub, the gateway as the hub's service and the pool's owner). A "notebook" process that holds
only what a notebook pod holds (MOCHI_LAB_GATEWAY and a hub token, no Redis URL, no Ray address, no
volume) makes a video with MochiCluster() and gets it through the gateway; an admin's token resizes
the pool with cluster/scripts/scale-workers.sh (kubectl stood in for, the gateway real); down.sh
leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import clusterlib as cl
from tests.support.fake_kubectl import FAKE_KUBECTL
from tests.support.local_cluster import alive, logs, marked_pids, pick_ports, read_env
from tests.support.rayenv import clean_env

UP = cl.CLUSTER / "local" / "up.sh"
DOWN = cl.CLUSTER / "local" / "down.sh"

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


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.usefixtures("cluster_scripts", "redis_server")
@pytest.mark.timeout(1500)
def test_a_hub_token_gets_a_video_through_the_gateway(tmp_path):
    ray_port, redis_port = pick_ports()
    state = Path(tempfile.mkdtemp(prefix="mochi-lg-", dir="/tmp"))  # short: Ray's socket paths
    env = clean_env("RAY_", "REDIS_", "MOCHI_", "JUPYTERHUB_")
    env["PYTHON"] = sys.executable
    cache = os.environ.get("MOCHI_LAB_CACHE_DIR") or str(state / "cache")
    try:
        try:
            up = subprocess.run(
                ["bash", str(UP), "--gateway", "--state-dir", str(state), "--ray-port", str(ray_port),
                 "--redis-port", str(redis_port), "--workers", "1", "--gpus-per-worker", "1", "--cpus-per-worker", "2"],
                capture_output=True, text=True, timeout=900, env={**env, "MOCHI_LAB_CACHE_DIR": cache},
            )
            assert up.returncode == 0, up.stdout + up.stderr + logs(state)
            info = json.loads((state / "cluster.json").read_text())
            assert {"hub", "gateway"} <= set(info["process_groups"])
            notebook_env = read_env(state / "notebook.env")
            assert set(notebook_env) == {"MOCHI_LAB_GATEWAY", "JUPYTERHUB_API_TOKEN"}
            gateway = notebook_env["MOCHI_LAB_GATEWAY"]
            assert gateway == info["gateway_url"]

            # --- the notebook: a hub token and the gateway's address, nothing else -------------------
            nb_env = {"PATH": env["PATH"], "HOME": str(tmp_path), "MOCHI_LAB_CACHE_DIR": str(tmp_path / "downloads"),
                      **notebook_env}
            run = subprocess.run([sys.executable, "-c", NOTEBOOK], capture_output=True, text=True, timeout=600,
                                 env=nb_env, cwd=cl.REPO)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:] + logs(state)
            result = json.loads(lines[-1][len("RESULT "):])
            assert result["backend"] == "GatewayBackend" and result["leaked"] == []
            assert result["frames"] == 7
            video = Path(result["path"])
            assert video.is_relative_to(tmp_path / "downloads")  # downloaded through the gateway
            # the same bytes over HTTP with the token, nothing without it
            token = notebook_env["JUPYTERHUB_API_TOKEN"]
            assert _get(f"{gateway}download/{result['job_id']}", None)[0] == 401
            code, body = _get(f"{gateway}download/{result['job_id']}", token)
            assert code == 200 and body == video.read_bytes()

            # --- the pool's owner resizes it for an admin, and only for an admin ----------------------
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            (bin_dir / "kubectl").write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
            (bin_dir / "kubectl").chmod(0o755)
            ops_env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_KUBECTL_STATE": str(tmp_path)}
            scale = ["bash", str(cl.CLUSTER / "scripts" / "scale-workers.sh"), "--url", gateway]
            out = subprocess.run([*scale, "--token-file", str(state / "admin_token"), "1"], env=ops_env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout + out.stderr + (state / "logs" / "gateway.log").read_text()[-3000:]
            out = subprocess.run([*scale, "1"], env={**ops_env, "MOCHI_LAB_ADMIN_TOKEN": token},
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode != 0 and "403" in out.stdout + out.stderr
        finally:
            down = subprocess.run(["bash", str(DOWN), "--state-dir", str(state), "--grace", "5"],
                                  capture_output=True, text=True, timeout=300, env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        left = {pid for pid in marked_pids(state) if alive(pid)}
        assert not left, left
        assert not (state / "notebook.env").exists() and not (state / "admin_token").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)
