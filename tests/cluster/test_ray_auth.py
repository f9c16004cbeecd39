"""Ray token authentication and the GCS's own Redis user, for real, on the installed Ray: a private
Ray head (its own temp dir, loopback, a free block of ports that holds neither 6379 nor Ray's default
ports) started the way KubeRay starts ours: RAY_AUTH_MODE=token with the cluster's token
(authOptions), its GCS in Redis as the user gcs with externalStorageNamespace mochi-ray
(gcsFaultToleranceOptions), that Redis started from the manifests (redisacl.py).

Without the token the dashboard's job API answers 401 and a Ray Client connection is refused; with
it a submitted job runs. The GCS needs nothing its ACL user lacks, writes only its own keys, and KubeRay's
cleanup (Ray's cleanup_redis_storage, as the gcs user) removes them all.

Only processes this module started are stopped, by process group and by the marker in their
environment (Ray's worker processes have process groups of their own); never `ray stop`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from tests.support import clusterlib as cl
from tests.support.ports import port_block
from tests.support.rayenv import clean_env
from tests.support.redisacl import RedisServer

pytestmark = pytest.mark.usefixtures("ray_local")  # a Ray head of the module's own: the integration tier

MARKER = "MOCHI_TEST_RAY_AUTH"
BLOCK = 64  # the head's ports, every one given to `ray start`: none of Ray's defaults


def _http(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _ours(state: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARKER) == state:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


class RayHead:
    def __init__(self, redis_server: RedisServer, docs: list[dict]):
        rc = cl.find(docs, "RayCluster")
        self.namespace = rc["spec"]["gcsFaultToleranceOptions"]["externalStorageNamespace"]
        self.redis_user = rc["spec"]["gcsFaultToleranceOptions"]["redisUsername"]["value"]
        assert rc["spec"]["authOptions"]["mode"] == "token"
        self.redis = redis_server
        self.token = secrets.token_hex(32)
        self.state = tempfile.mkdtemp(prefix="mra-", dir="/tmp")  # short: Ray's socket paths
        # outside the ephemeral range: a dashboard agent whose HTTP port an outgoing connection took stays up
        # without it, and the job API then answers "No available agent" for as long as the head runs
        b = port_block(BLOCK)
        self.gcs_port, self.client_port, self.dashboard_port = b, b + 1, b + 2
        self.ports = b
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env("RAY_", "REDIS")
        env.update(RAY_USAGE_STATS_ENABLED="0", **{MARKER: self.state}, **extra)
        return env

    def start(self) -> "RayHead":
        b = self.ports
        # what KubeRay sets for authOptions and gcsFaultToleranceOptions
        env = self.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                       RAY_REDIS_ADDRESS=f"127.0.0.1:{self.redis.port}",
                       RAY_external_storage_namespace=self.namespace,
                       REDIS_PASSWORD=self.redis.password(self.redis_user),
                       DASHBOARD_METRIC_PORT=str(b + 3), AUTOSCALER_METRIC_PORT=str(b + 4),
                       RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="120")
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
               "--port", str(self.gcs_port), "--node-ip-address", "127.0.0.2", "--temp-dir", self.state,
               "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
               "--ray-client-server-port", str(self.client_port),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(b + 5), "--dashboard-agent-grpc-port", str(b + 6),
               "--runtime-env-agent-port", str(b + 7), "--metrics-export-port", str(b + 8),
               "--node-manager-port", str(b + 9), "--object-manager-port", str(b + 10),
               "--min-worker-port", str(b + 20), "--max-worker-port", str(b + BLOCK - 1),
               "--redis-username", self.redis_user]
        # as KubeRay does: --redis-password $REDIS_PASSWORD
        cmd += ["--redis-password", env["REDIS_PASSWORD"]]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(Path(self.state) / "head.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while True:
            try:
                code, _ = _http(self.jobs_url)
                if code in (200, 401, 403):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = self.diagnosis()
                self.stop()
                raise RuntimeError(f"the Ray head did not come up:\n{why}")
            time.sleep(1)

    @property
    def jobs_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}/api/jobs/"

    def client_log(self) -> str:
        logs = Path(self.state, "session_latest", "logs")
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("ray_client_server*")))

    def diagnosis(self) -> str:
        """Whether the head still runs, and the tails of its logs: what a failure needs to be understood."""
        code = None if self.proc is None else self.proc.poll()
        state = "not started" if self.proc is None else "running" if code is None else f"exited {code}"
        parts = [f"ray start --block: {state}"]
        logs = Path(self.state, "session_latest", "logs")
        names = ("gcs_server.out", "raylet.out")
        for path in [Path(self.state) / "head.log", *(logs / n for n in names), *sorted(logs.glob("dashboard*.log"))]:
            if path.is_file():
                parts.append(f"--- {path.name}:\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the head: `ray start --block` stops its processes on SIGTERM; SIGKILL ends them as a deleted
        pod's are, at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        left = _ours(self.state)
        for p in left:
            p.send_signal(sig)
        _, alive = psutil.wait_procs(left, timeout=10)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)

    def remove(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture(scope="module")
def head(rendered, tmp_path_factory):
    srv = RedisServer(rendered["prod"], tmp_path_factory.mktemp("ray-auth-redis")).start()
    ray_head = RayHead(srv, rendered["prod"])
    try:
        ray_head.start()
        yield ray_head
    finally:
        ray_head.stop()
        srv.stop()
        assert not _ours(ray_head.state), "processes of the test's Ray head are left"
        ray_head.remove()


CLIENT = "import ray, sys; ray.init(sys.argv[1], logging_level='ERROR'); print('VALUE', ray.get(ray.remote(lambda: 41).remote()) + 1)"


@pytest.mark.timeout(900)
def test_the_job_api_needs_the_token(head):
    assert _http(head.jobs_url)[0] == 401
    assert _http(head.jobs_url, "not-the-token")[0] == 403
    assert _http(head.jobs_url, head.token) == (200, "[]")
    submit = {"entrypoint": "python -c \"print('submitted')\""}
    assert _http(head.jobs_url, None, submit)[0] == 401  # submission refused
    # The head's dashboard answers before its job agent has registered, and until then says so on a submission
    # ("No available agent to submit job, please try again later"): the condition waited for, with a deadline.
    deadline = time.monotonic() + 300
    while True:
        code, text = _http(head.jobs_url, head.token, submit)
        if not (code == 500 and "No available agent" in text) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert code == 200, f"{text}\n{head.diagnosis()}"  # an agent that never registered: the logs say why
    job = json.loads(text)["submission_id"]
    deadline = time.monotonic() + 300
    while True:
        try:
            status = json.loads(_http(head.jobs_url + job, head.token)[1])["status"]
        except urllib.error.URLError as exc:
            pytest.fail(f"the head stopped answering while its job ran ({exc}):\n{head.diagnosis()}")
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status == "SUCCEEDED", _http(head.jobs_url + job + "/logs", head.token)[1]


@pytest.mark.timeout(900)
def test_ray_client_needs_the_token(head):
    address = f"ray://127.0.0.2:{head.client_port}"
    # Ray's own 5 s per connection attempt, without its backoff's growth (5, 10 then 15 s asleep after a refusal)
    client_env = head.env(RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S="5", RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S="5")
    out = subprocess.run([sys.executable, "-c", CLIENT, address], env=client_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "VALUE" not in out.stdout
    # refused by Ray's auth, not for another reason
    assert "Authentication required" in head.client_log(), out.stderr[-2000:] + head.diagnosis()
    # (with the token it works: the job API test runs a job; a Ray Client session with it costs minutes here)


def test_the_gcs_keeps_to_its_own_keys_and_user(head):
    admin = head.redis.admin()
    keys = admin.keys("*")
    assert keys and all(k.startswith(f"RAY{head.namespace}@") for k in keys), keys
    # the gcs user's rules were enough for a head, a job and a Ray Client session
    assert [d for d in head.redis.denials() if d["username"] == "gcs"] == []
    for user in ("gateway", "worker"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            head.redis.client(user).hgetall(keys[0])


def test_kuberay_cleanup_as_the_gcs_user_removes_the_namespace(head):
    from ray._private.gcs_utils import cleanup_redis_storage

    head.stop(signal.SIGKILL)  # as when KubeRay deletes the cluster's pods
    admin = head.redis.admin()
    admin.hset("mochi:job:keep", "id", "keep")  # the job store is not Ray's to delete
    assert cleanup_redis_storage("127.0.0.1", head.redis.port, head.redis.password("gcs"), False, head.namespace,
                                 username="gcs")
    assert admin.keys("*") == ["mochi:job:keep"]
    assert [d for d in head.redis.denials() if d["username"] == "gcs"] == []
