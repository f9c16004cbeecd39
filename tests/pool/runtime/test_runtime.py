"""The local runtime outlives its kernels: a killed kernel's job completes on the warm pool, a new process
attaches in under 2 s and runs with load_s == 0, the runtime stops itself when idle leaving nothing behind,
stale records are never joined, and two first handles start one runtime. It rides out a short store outage,
stops when its store is gone for good or its data dir is deleted, listens on loopback only and keeps the
data dir private.

Kernels here are real processes (`python -c`), the runtime a real daemon with a real Ray head on 127.0.0.1;
"nothing behind" is checked by pid and by port. Each test's data dir lies under `runtimes_root`, whose
daemons the session stops at its end whatever happens. The kernel that dies mid-job dies while its job is
held at a gate (the runtime's workers inherit the session's MOCHI_LAB_TEST_GATES).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mochi_lab.cli import main
from mochi_lab.config import Settings
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool import runtime
from mochi_lab.pool.reaper import started
from mochi_lab.video import probe
from tests.support.faults_helpers import RedisServer, alive, is_loopback, listening, wait_for
from tests.support.tools import need_tool

IDLE_S = 8.0
GONE_S = 12.0  # the store-gone bound of the outage test: well above its 3 s outage
# what the runtime's log may grow by while its store is gone for GONE_S and it stops (it used to write a
# ~3.7 KB traceback every second)
OUTAGE_LOG_BYTES = 4096
DYING = "a kernel that dies, its job held at step 1"

KERNEL = """
import json, sys, time
from mochi_lab import MochiCluster
c = MochiCluster()
job = c.generate(sys.argv[2], seed=1, force=True, **json.loads(sys.argv[1]))
while job.refresh().status == "queued":
    time.sleep(0.05)
print(json.dumps({"job": job.id, "address": c.backend.ray_address, "status": job.status}), flush=True)
time.sleep(600)
"""

NEXT_KERNEL = """
import json, sys, time
import ray  # imported before the clock starts: a module import is the interpreter's cost, not the attach's
from mochi_lab import MochiCluster
t0 = time.perf_counter()
c = MochiCluster()
attach_s = time.perf_counter() - t0
first = c.job(sys.argv[1])
first.result(300)
second = c.generate("the next job", seed=2, force=True, **json.loads(sys.argv[2]))
path = second.result(300)
print(json.dumps({"attach_s": attach_s, "address": c.backend.ray_address, "first": first.status,
                  "first_attempts": first.record.attempts, "second_load_s": second.timings["load_s"],
                  "path": str(path)}), flush=True)
"""

# a kernel as a notebook has it: Ray imported before mochi_lab, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset
JOB = """
import json, sys
import ray
from mochi_lab import MochiCluster
c = MochiCluster()
job = c.generate(sys.argv[1], seed=3, force=True, **json.loads(sys.argv[2]))
print(json.dumps({"address": c.backend.ray_address, "job": job.id, "path": str(job.result(300))}), flush=True)
"""

FIRST_HANDLE = """
import json, sys, time
from mochi_lab import MochiCluster
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # both processes ask at the same moment
asked = time.time()
c = MochiCluster(start_pool=False)
print(json.dumps({"address": c.backend.ray_address, "asked": asked}), flush=True)
"""


@pytest.fixture
def home(runtimes_root, tiny_checkpoint, monkeypatch, ray_local):
    """A data dir of its own, with the persistent runtime on for this test's kernels (and its CLI calls): a
    runtime daemon, a Ray of its own."""
    data = runtimes_root / uuid.uuid4().hex[:8]
    data.mkdir(parents=True)
    for var, value in {"MOCHI_LAB_DATA_DIR": str(data), "MOCHI_LAB_PERSISTENT": "1", "MOCHI_LAB_WORKERS": "1",
                       "MOCHI_LAB_RUNTIME_IDLE_S": str(IDLE_S)}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's default: token auth, here with the runtime's own token
    yield data
    runtime.stop(data, timeout=60)


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy(), start_new_session=True)


def _json_line(proc: subprocess.Popen, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _family(record: dict) -> dict[int, float]:
    """The daemon and every process below it (Ray, its agents, the workers), by pid and start time."""
    top = psutil.Process(record["pid"])
    return {p.pid: started(p.pid) for p in [top, *top.children(recursive=True)]}


def _held(record: dict, ports: set[int]) -> list[tuple[int, int]]:
    """(pid, port) of each listener on one of `ports` that is a process of the runtime of `record`: its daemon
    leads a session of its own, and its Ray's processes stay in it. A port it freed that another program took
    since is not its: Ray's dashboard agent takes a fixed port, the kernel hands ephemeral ones to any process,
    and the other lane's tests start Rays of their own meanwhile."""
    held = []
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port not in ports or conn.pid is None:
            continue
        try:
            if os.getsid(conn.pid) == record["pid"]:
                held.append((conn.pid, conn.laddr.port))
        except ProcessLookupError:
            pass
    return held


def _assert_nothing_left(family: dict[int, float], record: dict, ports: set[int], timeout: float = 30) -> None:
    """No process of the runtime's family is alive, and none of its processes listens on `ports`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid, created in family.items() if alive(pid, created)]
        if not left and not _held(record, ports):
            return
        time.sleep(0.25)
    raise AssertionError(f"left behind: pids {left}, listening: {_held(record, ports)}")


def _port(record: dict) -> int:
    return int(record["address"].rsplit(":", 1)[1])


@pytest.mark.usefixtures("fault_injection")
def test_a_killed_kernels_job_completes_warm_and_the_idle_runtime_stops_leaving_nothing(home, tiny, hold):
    gate = hold(DYING)
    kernel = _python(KERNEL, json.dumps(tiny), DYING)
    try:
        line = kernel.stdout.readline()
        assert line, kernel.stderr.read()[-3000:]
        started = json.loads(line)
        assert gate.wait_reached() == [started["job"]]  # mid-denoise when its kernel dies
    finally:
        os.killpg(kernel.pid, signal.SIGKILL)
        kernel.wait()
    gate.release()
    record = runtime.live_record(home)
    assert record is not None and record["address"] == started["address"], "the runtime died with its kernel"
    assert started["status"] == "running"
    assert record["auth"] == "token" and Path(record["auth_token_path"]).stat().st_mode & 0o777 == 0o600
    family = _family(record)

    nxt = _json_line(_python(NEXT_KERNEL, started["job"], json.dumps(tiny)))
    print(f"\nruntime: attach {nxt['attach_s']:.2f} s after the kernel's SIGKILL; second job load_s "
          f"{nxt['second_load_s']}")
    assert nxt["attach_s"] < 2.0
    assert nxt["address"] == record["address"]
    assert (nxt["first"], nxt["first_attempts"]) == ("done", 1)  # ran on, never re-queued
    assert nxt["second_load_s"] == 0
    info = probe(Path(nxt["path"]))
    assert (info.frames, info.height, info.width) == (tiny["num_frames"], tiny["height"], tiny["width"])
    # (a handle for a model the runtime was not started with: tests/pool/runtime/test_runtime_models.py)

    # the last handle is gone: after IDLE_S (not before) the runtime stops, its processes and port with it
    gone_at = time.monotonic()
    daemon = psutil.Process(record["pid"])
    with pytest.raises(psutil.TimeoutExpired):
        daemon.wait(IDLE_S - 2)
    daemon.wait(IDLE_S + 30)
    idle_stop_s = time.monotonic() - gone_at
    print(f"runtime: stopped {idle_stop_s:.1f} s after its last handle left (idle timeout {IDLE_S:g} s)")
    _assert_nothing_left(family, record, {_port(record)})
    assert runtime.read_record(home) is None and not (home / runtime.TOKEN).exists()
    assert "idle for" in (home / runtime.LOG).read_text()


def test_two_first_handles_replace_a_stale_record_with_one_runtime_that_status_shows_and_down_stops(
        home, capsys):
    # a record whose daemon is dead and whose port another program now listens on
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"address": f"127.0.0.1:{squatter.getsockname()[1]}", "pid": dead.pid, "pid_started": 0.0,
             "model": "tiny"}
    (home / runtime.RECORD).write_text(json.dumps(stale))
    try:
        go = time.time() + 4  # after both have imported mochi_lab and Ray
        handles = [_python(FIRST_HANDLE, str(go)) for _ in range(2)]
        answers = [_json_line(h) for h in handles]
    finally:
        squatter.close()
    record = runtime.live_record(home)
    assert record is not None and record["address"] != stale["address"]
    assert {a["address"] for a in answers} == {record["address"]}
    # both asked before the runtime was up: the second one waited on the lock, it did not find a record
    assert max(a["asked"] for a in answers) < record["started_at"]
    daemons = [p for p in psutil.process_iter(["cmdline"])
               if "mochi_lab.pool.runtime" in (p.info["cmdline"] or []) and (p.info["cmdline"] or [])[-1] == str(home)]
    assert [p.pid for p in daemons] == [record["pid"]]

    assert main(["status", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["address"], shown["pid"], shown["model"]) == (record["address"], record["pid"], "tiny")
    assert shown["rss_bytes"] > 0 and shown["idle_timeout_s"] == IDLE_S
    assert [w["worker_id"] for w in shown["worker_rows"]] == ["mochi-worker-0"]

    family = _family(record)
    assert main(["down"]) == 0
    assert f"stopped the local runtime at {record['address']}" in capsys.readouterr().out
    _assert_nothing_left(family, record, {_port(record)})
    assert main(["status"]) == 1


def test_a_record_is_stale_unless_its_own_daemon_listens_on_its_port(tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    address = f"127.0.0.1:{squatter.getsockname()[1]}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a process that looks like a daemon (its command line) but whose family holds no port
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mochi_lab.pool.runtime"])
    try:
        me = psutil.Process(lookalike.pid)
        deadline = time.monotonic() + 10
        while "mochi_lab.pool.runtime" not in me.cmdline():  # Popen can return before /proc shows the new command line
            assert time.monotonic() < deadline, me.cmdline()
            time.sleep(0.01)
        assert "is gone" in runtime.stale_reason({"address": address, "pid": dead.pid, "pid_started": 0.0})
        assert "is gone" in runtime.stale_reason({"address": address, "pid": os.getpid(),
                                                  "pid_started": started(os.getpid())})
        assert "is gone" in runtime.stale_reason({"address": address, "pid": me.pid, "pid_started": 1.0})
        assert "no process of its Ray session listens" in runtime.stale_reason(
            {"address": address, "pid": me.pid, "pid_started": started(me.pid)})
        (tmp_path / runtime.RECORD).write_text(json.dumps({"address": address, "pid": dead.pid, "pid_started": 0}))
        assert runtime.live_record(tmp_path) is None
        assert runtime.stop(tmp_path) is None and not (tmp_path / runtime.RECORD).exists()
    finally:
        lookalike.kill()
        lookalike.wait()
        squatter.close()


def test_a_runtime_is_joined_only_for_its_model_store_namespace_and_pipeline(tmp_path):
    settings = Settings(data_dir=tmp_path)
    record = {"address": "127.0.0.1:1234", "pid": 1, "model": "tiny", "workers": 1, "namespace": "mochi_lab",
              "store": f"sqlite:///{tmp_path / 'store.sqlite3'}"}
    runtime.check_compatible(record, settings, "tiny")
    with pytest.raises(runtime.RuntimeMismatch, match=r"serves model 'tiny' \(1 worker\(s\)\), not 'mochi-1-preview'"):
        runtime.check_compatible(record, settings, "mochi-1-preview")
    with pytest.raises(runtime.RuntimeMismatch, match="uses the store sqlite:///elsewhere"):
        runtime.check_compatible({**record, "store": "sqlite:///elsewhere"}, settings, "tiny")
    with pytest.raises(runtime.RuntimeMismatch, match="namespace 'other'"):
        runtime.check_compatible({**record, "namespace": "other"}, settings, "tiny")
    record["pipeline"] = PipelineConfig().model_dump(mode="json")
    runtime.check_compatible(record, settings, "tiny", PipelineConfig())
    with pytest.raises(runtime.RuntimeMismatch, match="'cpu_offload': False.*not .*'cpu_offload': True"):
        runtime.check_compatible(record, settings, "tiny", PipelineConfig(cpu_offload=True))


def _record(data_dir: Path) -> dict:
    return runtime.read_record(data_dir) or {}


@pytest.mark.usefixtures("fault_injection")
def test_a_runtime_rides_out_a_short_store_outage_and_stops_when_its_store_is_gone_for_good(
        home, tiny, tmp_path, monkeypatch, capsys):
    need_tool("redis-server")
    server = RedisServer(tmp_path / "redis").start()
    try:
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("MOCHI_LAB_RUNTIME_IDLE_S", "600")  # here only the store may stop it
        monkeypatch.setenv("MOCHI_LAB_RUNTIME_STORE_GONE_S", str(GONE_S))
        home.chmod(0o755)  # a data dir the user made, open to others on purpose: it keeps its mode
        first = _json_line(_python(JOB, "before the outage", json.dumps(tiny)))
        record = runtime.live_record(home)
        assert record is not None and record["address"] == first["address"] and record["store_gone_s"] == GONE_S
        assert home.stat().st_mode & 0o777 == 0o755
        for name in (runtime.RECORD, runtime.LOG, runtime.LOCK, runtime.TOKEN):
            assert (home / name).stat().st_mode & 0o777 == 0o600, name
        family = _family(record)
        ports = {port for _, _, port in listening([psutil.Process(pid) for pid in family])}
        assert {port for _, port in _held(record, ports)} == ports  # the check sees the runtime's servers
        workers = _worker_pids(server.url)
        # the first handle has left: the idle clock runs
        idle_since = wait_for(lambda: _record(home)["drivers"] == 0 and _record(home)["idle_since"], 60, "idleness")

        # a 3 s outage changes nothing: the same daemon, worker and idle clock, and the next job runs
        killed = time.monotonic()
        server.kill()
        down_since = wait_for(lambda: _record(home)["store_down_since"], 30, "the runtime to see the outage")
        assert main(["status"]) == 0
        shown = capsys.readouterr().out
        assert f"store unreachable since {time.strftime('%H:%M:%S', time.localtime(down_since))}" in shown, shown
        assert f"stops after {GONE_S:g} s unreachable" in shown
        time.sleep(max(0.0, killed + 3 - time.monotonic()))  # the outage's length, not a wait on the machine
        server.start()
        wait_for(lambda: _record(home)["store_down_since"] is None, 60, "the runtime to see the store back")
        after = runtime.live_record(home)
        assert (after["pid"], after["address"], after["idle_since"]) == (record["pid"], record["address"], idle_since)
        assert _worker_pids(server.url) == workers  # not restarted
        nxt = _json_line(_python(JOB, "after the outage", json.dumps(tiny)))
        assert nxt["address"] == record["address"]
        info = probe(Path(nxt["path"]))
        assert (info.frames, info.height, info.width) == (tiny["num_frames"], tiny["height"], tiny["width"])
        assert main(["status"]) == 0 and "store unreachable" not in capsys.readouterr().out

        # gone for good: with no handle attached the runtime stops after GONE_S (not before), leaving nothing
        wait_for(lambda: _record(home)["drivers"] == 0, 60, "the job's handle to detach")
        log_before = (home / runtime.LOG).stat().st_size
        daemon = psutil.Process(record["pid"])
        server.kill()
        killed = time.monotonic()
        with pytest.raises(psutil.TimeoutExpired):
            daemon.wait(GONE_S - 1)
        daemon.wait(GONE_S + 90)  # the bound, then the pool's drain (2 leases at most) and Ray's stop
        print(f"\nruntime: stopped {time.monotonic() - killed:.1f} s after its store went away (bound {GONE_S:g} s)")
        _assert_nothing_left(family, record, ports)
        assert runtime.read_record(home) is None and not (home / runtime.TOKEN).exists()
        log = (home / runtime.LOG).read_text()
        grown = len(log.encode()) - log_before
        print(f"runtime: its log grew by {grown} bytes over the {GONE_S:g} s outage and the stop")
        assert grown < OUTAGE_LOG_BYTES, log[-6000:]
        assert re.search(r"store unreachable for \d+ s with no handle attached: stopping", log), log[-6000:]
    finally:
        server.kill()


def _worker_pids(url: str) -> dict[str, int]:
    from mochi_lab.store import open_store

    store = open_store(url)
    try:
        return {w["worker_id"]: w["pid"] for w in store.workers()}
    finally:
        store.close()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.usefixtures("fault_injection", "ray_local")
def test_a_runtime_on_a_new_data_dir_listens_on_loopback_keeps_its_files_private_and_stops_when_the_dir_is_deleted(
        runtimes_root, tiny_checkpoint, tiny, monkeypatch):
    data = runtimes_root / uuid.uuid4().hex[:8] / "data"  # not there yet: the first handle makes it
    for var, value in {"MOCHI_LAB_DATA_DIR": str(data), "MOCHI_LAB_PERSISTENT": "1", "MOCHI_LAB_WORKERS": "1",
                       "MOCHI_LAB_RUNTIME_IDLE_S": "600"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)  # unset, as in a notebook's environment
    try:
        done = _json_line(_python(JOB, "a private video", json.dumps(tiny)))
        record = runtime.live_record(data)
        assert record is not None and record["address"] == done["address"]
        family = _family(record)
        sockets = listening([psutil.Process(pid) for pid in family])
        ports = {port for _, _, port in sockets}
        assert _port(record) in ports  # the check sees Ray's servers
        assert {port for _, port in _held(record, ports)} == ports  # ... and knows them for the runtime's
        assert [s for s in sockets if not is_loopback(s[1])] == []

        assert _mode(data) == 0o700
        made = {p.relative_to(data).as_posix(): _mode(p) for p in data.rglob("*")}
        video = Path(done["path"]).relative_to(data).as_posix()
        assert {"store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm", runtime.RECORD, runtime.LOG, runtime.LOCK,
                runtime.TOKEN, "artifacts", "artifacts/alice", video, video.replace(".mp4", ".png")} <= set(made)
        assert {name: oct(mode) for name, mode in made.items()
                if mode != (0o700 if (data / name).is_dir() else 0o600)} == {}

        # deleted under it: the runtime stops, leaving no process, port or folder
        wait_for(lambda: _record(data)["drivers"] == 0 and _record(data)["idle_since"], 60, "the handle to detach")
        daemon = psutil.Process(record["pid"])
        shutil.rmtree(data)
        daemon.wait(90)
        _assert_nothing_left(family, record, ports)
        assert not data.exists()
    finally:
        runtime.stop(data, timeout=60)
