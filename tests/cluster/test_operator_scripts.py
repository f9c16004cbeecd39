"""deploy-all.sh and scale-workers.sh against a stand-in kubectl (fake_kubectl below: it records each
call and its stdin, keeps Secrets in a JSON file, and runs `kubectl exec ... -- CMD` here) and, for
the pool, a stand-in gateway (an HTTP server that records the request): what they change, in which
order, and that no secret value is ever on a command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.support import clusterlib as cl
from tests.support.fake_kubectl import FAKE_KUBECTL


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBECTL_STATE": str(tmp_path)}
    env.pop("MOCHI_LAB_ADMIN_TOKEN", None)

    def calls() -> list[dict]:
        path = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return env, calls, tmp_path


class Gateway:
    """Answers POST .../workers/scale like the gateway: 200 for the admin's token, 403 otherwise."""

    def __init__(self, admin_token: str):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                ok = self.headers.get("Authorization") == f"token {admin_token}"
                self.send_response(200 if ok else 403)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}' if ok else b'{"error": "forbidden"}')

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


SCALE = cl.CLUSTER / "scripts" / "scale-workers.sh"
DEPLOY = cl.CLUSTER / "scripts" / "deploy-all.sh"


def _no_secret_in_argv(calls, secret: str):
    for call in calls:
        assert secret not in " ".join(call["argv"]), call["argv"]


@pytest.mark.parametrize("via", ["exec", "url"])
def test_scale_workers_resizes_the_pool_through_the_gateway(fake, via):
    env, calls, _ = fake
    token = "admin-" + os.urandom(8).hex()
    gw = Gateway(token)
    try:
        env["FAKE_GATEWAY_PORT"] = str(gw.port)
        env["MOCHI_LAB_ADMIN_TOKEN"] = token
        extra = [] if via == "exec" else ["--url", f"http://127.0.0.1:{gw.port}/services/mochi-lab/"]
        out = subprocess.run(["bash", str(SCALE), *extra, "5"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        (req,) = gw.requests
        assert req["path"] == "/services/mochi-lab/workers/scale"
        assert req["auth"] == f"token {token}" and json.loads(req["body"]) == {"n": 5}
        done = calls()
        patches = [c["argv"] for c in done if "patch" in c["argv"]]
        assert any("raycluster" in a for a in patches) and any("configmap" in a for a in patches)
        rc_patch = json.loads(next(a for a in patches if "raycluster" in a)[-1])
        assert {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 3} in rc_patch
        assert any('"MOCHI_LAB_WORKERS": "5"' in " ".join(a) for a in patches)
        _no_secret_in_argv(done, token)
        # not an admin: the gateway says 403 and the script fails
        env["MOCHI_LAB_ADMIN_TOKEN"] = "someone-else"
        out = subprocess.run(["bash", str(SCALE), *extra, "5"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "403" in out.stdout + out.stderr
    finally:
        gw.close()


def test_scale_workers_without_a_token_changes_nothing(fake):
    env, calls, _ = fake
    out = subprocess.run(["bash", str(SCALE), "5"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "admin token" in out.stderr
    assert calls() == []
    out = subprocess.run(["bash", str(SCALE), "--no-pool", "5"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not any("exec" in c["argv"] for c in calls())


def test_scale_workers_reads_the_token_from_a_file(fake, tmp_path):
    env, calls, _ = fake
    token = "file-" + os.urandom(8).hex()
    (tmp_path / "token").write_text(token + "\n")
    gw = Gateway(token)
    try:
        env["FAKE_GATEWAY_PORT"] = str(gw.port)
        out = subprocess.run(["bash", str(SCALE), "--token-file", str(tmp_path / "token"), "2"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert gw.requests[0]["auth"] == f"token {token}"
        _no_secret_in_argv(calls(), token)
    finally:
        gw.close()


def test_deploy_all_creates_the_secrets_once_and_completes_them(fake):
    env, calls, state = fake
    run = ["bash", str(DEPLOY), "--skip-jupyterhub", "--no-wait", "-o", "dev"]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    secrets = json.loads((state / "secrets.json").read_text())
    assert set(secrets["mochi-redis"]) == {"gateway-password", "worker-password", "gcs-password", "healthcheck-password"}
    assert set(secrets["mochi-ray-auth"]) == {"auth_token"}
    values = [v for s in secrets.values() for v in s.values()]
    assert len(set(values)) == len(values)
    for v in values:
        assert re.fullmatch(r"[0-9a-f]{64}", v)  # what Redis' ACL lines and start.sh accept
        _no_secret_in_argv(calls(), v)
    argv = [" ".join(c["argv"]) for c in calls()]
    assert argv.index(next(a for a in argv if "create secret generic mochi-redis" in a)) < argv.index(
        next(a for a in argv if a.startswith("apply -k")))
    # a second run keeps every value; a key that went missing is added, alone
    del secrets["mochi-redis"]["gcs-password"]
    (state / "secrets.json").write_text(json.dumps(secrets))
    kept = dict(secrets["mochi-redis"])
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    again = json.loads((state / "secrets.json").read_text())
    assert {k: again["mochi-redis"][k] for k in kept} == kept
    assert set(again["mochi-redis"]) == set(kept) | {"gcs-password"}
    assert again["mochi-ray-auth"] == secrets["mochi-ray-auth"]
    assert "mochi-redis: added gcs-password" in out.stdout
    _no_secret_in_argv(calls(), again["mochi-redis"]["gcs-password"])
