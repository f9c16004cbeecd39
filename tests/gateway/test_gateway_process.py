"""A real `mochi-lab gateway` process, as a single machine runs it: its own embedded Ray
(MOCHI_LAB_PERSISTENT=0), SQLite in a folder of its own, the tiny model, static tokens, and uvicorn's
logging as `serve()` sets it up. What only a process shows: which thread owns Ray, the process's memory,
its access log.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from mochi_lab.video import probe
from tests.support.jobkit import TINY
from tests.support.ports import free_port

# the gateway process starts an embedded Ray of its own: the integration tier
pytestmark = pytest.mark.usefixtures("ray_local")

MIB = 1 << 20
BURST = 120
ANYIO_THREADS = 40  # anyio's default thread limiter: the most worker threads a burst can grow


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    token: str
    data_dir: Path
    log: Path

    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"token {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, trust_env=False)


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("gateway-process")
    token, port = secrets.token_hex(32), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "REDIS_", "RAY_ADDRESS"))}
    env.update({
        "MOCHI_LAB_DATA_DIR": str(root / "data"), "MOCHI_LAB_PERSISTENT": "0", "MOCHI_LAB_WORKERS": "1",
        "MOCHI_LAB_NAMESPACE": f"gwproc-{uuid.uuid4().hex[:8]}", "MOCHI_LAB_GATEWAY_PORT": str(port),
        "MOCHI_LAB_GATEWAY_TOKENS": json.dumps({hashlib.sha256(token.encode()).hexdigest(): {"account": "alice"}}),
        "PYTHONUNBUFFERED": "1",  # the access log reaches the file as it is written
    })
    log = root / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mochi_lab.cli", "gateway"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    gw = Served(f"http://127.0.0.1:{port}", proc, token, root / "data", log)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600  # its Ray and its worker start on a loaded 2-core machine
        while True:
            assert proc.poll() is None, f"the gateway exited {proc.returncode}:\n{_log_tail(log)}"
            try:
                if httpx.get(f"{gw.url}/healthz", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the gateway did not answer in time:\n{_log_tail(log)}"
            time.sleep(0.2)
        children = gw.process().children(recursive=True)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)  # its Ray dies with it (and its reaper ends the rest)
        for p in alive:
            p.kill()


def _ray_processes(gw: Served) -> list[psutil.Process]:
    return [p for p in gw.process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]


def _threads(proc: psutil.Process) -> set[int]:
    return {t.id for t in proc.threads()}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _burst(port: int, n: int) -> list[bytes]:
    """n anonymous GET /healthz on n connections, all sent before any answer is read; their status codes."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(n)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        codes = []
        for s in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            codes.append(data.split(b" ", 2)[1])
        return codes
    finally:
        for s in socks:
            s.close()


def test_a_burst_without_a_token_then_idleness_leaves_its_ray_alive_and_a_job_completes(served, tmp_path):
    """Ray's processes die with the thread that started them (PR_SET_PDEATHSIG), and anyio ends worker
    threads that idled 10 s once a burst grew its pool: the gateway must not start Ray on one of them."""
    me = served.process()
    ray = _ray_processes(served)
    assert {p.name() for p in ray} == {"gcs_server", "raylet"}, [p.name() for p in ray]
    before = _threads(me)

    # The burst must overlap for anyio's pool to grow, whatever this machine's speed: the store's write lock,
    # held meanwhile, keeps each /healthz in its thread until the pool is full, then lets them all finish.
    store = sqlite3.connect(served.data_dir / "store.sqlite3", isolation_level=None, timeout=30)
    store.execute("BEGIN IMMEDIATE")
    locked = True
    try:
        codes: list[bytes] = []
        burst = threading.Thread(target=lambda: codes.extend(_burst(int(served.url.rsplit(":", 1)[1]), BURST)))
        burst.start()
        deadline = time.monotonic() + 25  # within the store's 30 s busy timeout
        while len(_threads(me) - before) < ANYIO_THREADS - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        store.execute("COMMIT")
        locked = False
        burst.join(180)
    finally:
        if locked:
            store.execute("ROLLBACK")
        store.close()
    assert codes == [b"200"] * BURST
    grown = _threads(me) - before
    assert len(grown) >= ANYIO_THREADS // 2, f"the burst grew anyio's pool by {len(grown)} threads only"

    # Idle: anyio ends the worker threads idle for WorkerThread.MAX_IDLE_TIME (10 s) at the next call into
    # its pool, all but the one that call takes; a request now and then is that call.
    deadline = time.monotonic() + 180
    with served.client() as anon:
        while len(grown & _threads(me)) > 1:
            assert time.monotonic() < deadline, f"{len(grown & _threads(me))} of the burst's threads still there"
            assert anon.get("/healthz").status_code == 200
            time.sleep(0.5)
    assert all(_alive(p) for p in ray), [(p.pid, p.name(), _alive(p)) for p in ray]

    with served.client(served.token) as alice:
        r = alice.post("/generate", json={"params": {"prompt": "after the burst", "seed": 7, **TINY}, "reuse": False})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while (job := alice.get(f"/status/{job_id}").json())["status"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "done", job
        video = tmp_path / "after-burst.mp4"
        video.write_bytes(alice.get(f"/download/{job_id}").content)
    info = probe(video)
    assert (info.frames, info.width, info.height) == (TINY["num_frames"], TINY["width"], TINY["height"])
    assert all(_alive(p) for p in ray)


def _peak_reset(proc: psutil.Process) -> int:
    """Reset the process's peak resident size (VmHWM) to its resident size now; returns that size."""
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    return _peak(proc)


def _peak(proc: psutil.Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_body_without_a_token_is_refused_unread(served):
    """11 MiB of JSON without a token, three times, whole and chunked: 401, and the gateway's peak memory
    grows by less than a quarter of one body (it was read and parsed before the token was checked)."""
    body = json.dumps({"params": {"prompt": "x"}, "tags": list(range(11 * MIB // 8))}).encode()
    assert len(body) >= 11 * MIB
    me = served.process()
    start = _peak_reset(me)
    with served.client() as anon:
        for _ in range(3):
            r = anon.post("/generate", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 401, r.text[:200]
        chunks = (body[i:i + MIB] for i in range(0, len(body), MIB))  # no Content-Length: chunked
        r = anon.post("/generate", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text[:200]
    grew = _peak(me) - start
    # (it grew by about 8 bodies when the body was read before the token was checked)
    assert grew < len(body) // 4, f"the gateway's peak memory grew by {grew / MIB:.1f} MiB"


def test_the_access_log_never_holds_a_query_string(served):
    marks = {name: secrets.token_hex(12) for name in ("token", "access_token", "code", "state", "other")}
    with served.client() as anon:
        anon.get("/whoami", params={"token": marks["token"]})
        anon.get("/status/18c0c0c0c0c-0123456789ab", params={"access_token": marks["access_token"]})
        anon.get("/login", params={"code": marks["code"], "state": marks["state"]})
        anon.get("/healthz", params={"x": marks["other"]})
        end = f"/end-of-test-{uuid.uuid4().hex}"
        assert anon.get(end).status_code == 404
    deadline = time.monotonic() + 30
    while end not in (text := served.log.read_text(errors="replace")):  # the last line written
        assert time.monotonic() < deadline, _log_tail(served.log)
        time.sleep(0.1)
    for name, mark in marks.items():
        assert mark not in text, f"the {name} query parameter reached the log"
    assert '"GET /whoami HTTP/1.1" 401' in text and '"GET /login HTTP/1.1"' in text  # logged, without queries
