"""The local runtime: a Ray head and its warm pool on this machine that outlive the kernels using them.

With no `RAY_ADDRESS` (and `persistent` on), the first handle starts a daemon owned by no kernel:

    python -m mochi_lab.pool.runtime serve DATA_DIR     (settings, model and pipeline arrive on stdin)

It starts Ray on 127.0.0.1 as its own driver (so Ray's processes are its children and the reaper ends
them if the daemon is SIGKILLed), creates the pool, and records itself in `<data_dir>/runtime.json`
(address, pid, session dir, model, the models it knows, store). Later handles in any process read the
record, check that it is alive and attach as Ray drivers, whatever known model they ask for: its workers
load a job's model on demand and go back to the runtime's own while idle, as the cluster pool's do. The
daemon stops itself (pool, Ray, record) after `runtime_idle_s` with no attached driver and no busy worker;
with no attached driver, once its store has been unreachable for `runtime_store_gone_s` (or `runtime_idle_s`
if shorter); when its data dir is deleted under it; or on SIGTERM (`mochi-lab down`). Its log,
`<data_dir>/runtime.log`, rotates (mochi_lab.logs).

The daemon runs under a 077 umask (mochi_lab.private): what it, its Ray and its workers create is its
user's alone, and so is what a handle creates in the data dir.

Ray runs with token authentication, with a fresh token per runtime in `<data_dir>/ray_auth_token` (0600),
never Ray's machine-wide `~/.ray/auth_token`, which any other local Ray start may create or rewrite under
it; `RAY_AUTH_MODE=disabled` in the starter's environment opts out.

Every start, attach and stop happens under an fcntl lock on `<data_dir>/runtime.lock`: two first handles
start one runtime, and a runtime never stops while a handle is attaching to it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psutil

from mochi_lab.config import (
    Settings,
    child_env,
    default_ray_env,
    known_models,
    ray_auth_disabled,
    redact_url,
    set_ray_env,
)
from mochi_lab.logs import LOG_BACKUPS, LOG_MAX_BYTES, RotatingLog, log_repeating
from mochi_lab.model import StoreError
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool.connection import connect, import_ray
from mochi_lab.pool.driver import Pool
from mochi_lab.pool.reaper import started
from mochi_lab.private import PRIVATE_UMASK, open_private, private_dir
from mochi_lab.store import open_store

log = logging.getLogger(__name__)

RECORD, LOCK, LOG, TOKEN = "runtime.json", "runtime.lock", "runtime.log", "ray_auth_token"
START_TIMEOUT_S = 300.0  # a cold Ray start on a loaded laptop can take a minute (Ray retries once)
STOP_TIMEOUT_S = 120.0
PKG_ROOT = Path(__file__).resolve().parents[2]  # the daemon imports this very copy of mochi_lab

_attached: str | None = None  # the runtime address this process joined last


class RuntimeMismatch(RuntimeError):
    """The running local runtime uses another store, namespace or pipeline than this handle asks for, or does
    not know its model (or knows that name as another checkpoint)."""


# -- the record --------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # readers never see half a record


def read_record(data_dir: Path) -> dict[str, Any] | None:
    """The record as written (alive or not), or None."""
    try:
        return json.loads((Path(data_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _daemon(record: dict[str, Any]) -> psutil.Process | None:
    """The record's daemon if that very process (pid and start time) still runs, else None."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if started(proc.pid) != float(record["pid_started"]) or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc if "mochi_lab.pool.runtime" in " ".join(proc.cmdline()) else None
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def stale_reason(record: dict[str, Any]) -> str | None:
    """Why `record` must not be joined (None: it is live). Live means: the daemon (pid and start time)
    runs, and the record's GCS port is listened on by one of the daemon's own descendants, so a port
    taken over by another program, or a pid reused, never passes."""
    proc = _daemon(record)
    if proc is None:
        return f"its daemon (pid {record.get('pid')}) is gone"
    try:
        port = int(str(record["address"]).rsplit(":", 1)[1])
        for child in proc.children(recursive=True):
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                    return None
            except psutil.Error:
                continue
    except (psutil.Error, KeyError, IndexError, ValueError):
        pass
    return f"no process of its Ray session listens on {record.get('address')}"


def live_record(data_dir: Path) -> dict[str, Any] | None:
    record = read_record(data_dir)
    return record if record is not None and stale_reason(record) is None else None


@contextmanager
def _flocked(fh: IO) -> Iterator[None]:
    fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel too if this process dies holding it
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    with open_private(private_dir(data_dir) / LOCK) as fh, _flocked(fh):
        yield


# -- the handle's side -------------------------------------------------------------------------------
def check_compatible(record: dict[str, Any], settings: Settings, model: str,
                     pipeline: PipelineConfig | None = None) -> None:
    """Refuse to attach where the runtime would serve this handle wrongly.

    Any model the runtime knows is served: a worker loads a job's model when it claims the job and goes back
    to the runtime's model while idle (mochi_lab.worker), so no handle loses its warm model for long. The
    store, the namespace and the pipeline belong to the workers themselves: changing them would restart the
    workers under the other handles, and the pipeline is not part of a job's params, so neither a worker nor
    the result cache could tell a job made with another one."""
    how = ("stop it with `mochi-lab down` (queued jobs stay queued) and start again, or use "
           "MochiCluster(persistent=False) (or MOCHI_LAB_PERSISTENT=0) for a runtime of this process alone")
    runtime = f"the local runtime at {record['address']} (pid {record['pid']})"
    if record["store"] != redact_url(settings.store_url):
        raise RuntimeMismatch(f"{runtime} uses the store {record['store']}, "
                              f"not {redact_url(settings.store_url)}: {how}")
    if record["namespace"] != settings.namespace:
        raise RuntimeMismatch(f"{runtime} runs its pool in namespace {record['namespace']!r}, "
                              f"not {settings.namespace!r}: {how}")
    if pipeline is not None and record.get("pipeline") != pipeline.model_dump(mode="json"):
        raise RuntimeMismatch(f"{runtime} runs its pipeline with {record.get('pipeline')}, not "
                              f"{pipeline.model_dump(mode='json')}: {how}")
    # a record without "models" was written by a runtime that served its own model only
    served: dict[str, str] = record.get("models") or {record["model"]: known_models().get(record["model"], "")}
    if model not in served:
        raise RuntimeMismatch(f"{runtime} serves model {record['model']!r} ({record['workers']} worker(s)), "
                              f"not {model!r}: it loads on demand only the models it was started with "
                              f"({', '.join(sorted(served))}; MOCHI_LAB_MODELS adds more): {how}")
    mine = known_models().get(model)
    if mine is not None and served[model] != mine:
        raise RuntimeMismatch(f"{runtime} knows model {model!r} as {served[model]}, not {mine} "
                              f"(MOCHI_LAB_MODELS differs): {how}")


def attach(settings: Settings, model: str, pipeline: PipelineConfig) -> Settings:
    """Join the live local runtime of `settings.data_dir`, starting it first if there is none (or only a
    stale record). Returns `settings` with the runtime's address; this process is then its Ray driver."""
    global _attached
    with _locked(settings.data_dir):
        record = read_record(settings.data_dir)
        why = stale_reason(record) if record is not None else None
        if record is None or why is not None:
            if record is not None:
                log.warning("replacing the stale local runtime record (%s)", why)
                broken = _daemon(record)
                if broken is not None:  # alive but its Ray is not: end it (the reaper ends its Ray) before a new one
                    broken.kill()
                (settings.data_dir / RECORD).unlink(missing_ok=True)
            record = _start_daemon(settings, model, pipeline)
        check_compatible(record, settings, model, pipeline)
        joined = settings.model_copy(update={"ray_address": record["address"]})
        ray = import_ray()
        if ray.is_initialized() and _attached != record["address"] and \
                ray.get_runtime_context().gcs_address == _attached:
            ray.shutdown()  # the runtime this process had joined is gone (`mochi-lab down`); join the new one
        _use_auth(record)
        # Under the lock: the daemon cannot decide it is idle between our check and our joining.
        connect(joined)
        _attached = record["address"]
        return joined


def _use_auth(record: dict[str, Any]) -> None:
    """Make this process's Ray driver authenticate as the runtime's Ray expects. The variables stay set
    (one process joins one Ray); Ray caches its config and token, so both are reloaded, as Ray's own
    `_enable_token_auth` does."""
    set_ray_env(RAY_AUTH_TOKEN=None)  # Ray prefers it to the file: it would be another cluster's
    set_ray_env(RAY_AUTH_MODE=record.get("auth", "disabled"))
    if record.get("auth") == "token":
        set_ray_env(RAY_AUTH_TOKEN_PATH=record["auth_token_path"])
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _start_daemon(settings: Settings, model: str, pipeline: PipelineConfig) -> dict[str, Any]:
    data_dir = Path(settings.data_dir)
    env = child_env(PKG_ROOT)
    spec = {"settings": settings.model_dump(mode="json"), "model": model, "pipeline": pipeline.model_dump(mode="json")}
    with open_private(data_dir / LOG, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "mochi_lab.pool.runtime", "serve", str(data_dir)],
                                stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, cwd=data_dir,
                                env=env, start_new_session=True)  # no kernel's signals reach it
    # the spec holds the store URL with its password: through a pipe, never argv (visible to `ps`)
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        record = read_record(data_dir)
        if record is not None and record.get("pid") == proc.pid:
            return record
        if proc.poll() is not None:
            raise RuntimeError(f"the local runtime failed to start (exit {proc.returncode}); its log "
                               f"{data_dir / LOG} ends:\n{_tail(data_dir / LOG)}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"the local runtime did not start in {START_TIMEOUT_S:.0f} s; see {data_dir / LOG}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def processes(record: dict[str, Any]) -> list[psutil.Process]:
    """The record's daemon and every process below it: its Ray and the workers (none if it is gone)."""
    proc = _daemon(record)
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def status(data_dir: Path) -> dict[str, Any] | None:
    """What `mochi-lab status` shows: the live runtime's record (with `store_down_since` while its store
    is unreachable) plus its workers, idle time and memory (the daemon and every process below it: Ray
    and the workers). None when no runtime is live."""
    record = live_record(data_dir)
    if record is None:
        return None
    procs = processes(record)
    rss = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
        except psutil.Error:
            pass
    idle_since = record.get("idle_since")
    return {**record, "rss_bytes": rss, "processes": len(procs),
            "idle_s": None if idle_since is None else round(time.time() - idle_since, 1)}


def stop(data_dir: Path, timeout: float = STOP_TIMEOUT_S) -> dict[str, Any] | None:
    """Stop the live runtime (its pool, Ray and record); returns its last record, or None if none ran.
    A daemon that does not finish in `timeout` is killed, and the reaper ends its Ray."""
    record = read_record(data_dir)
    proc = _daemon(record) if record else None
    if proc is None:
        if record is not None:
            (Path(data_dir) / RECORD).unlink(missing_ok=True)
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        (Path(data_dir) / RECORD).unlink(missing_ok=True)
    return record


# -- the daemon --------------------------------------------------------------------------------------
class _Daemon:
    def __init__(self, data_dir: Path, settings: Settings, model: str, pipeline: PipelineConfig):
        self.data_dir, self.settings, self.model, self.pipeline = data_dir, settings, model, pipeline
        self.stopping = threading.Event()
        self.down_at: float | None = None  # monotonic start of the store outage under way

    def run(self) -> int:
        import ray

        folder = os.stat(self.data_dir)
        self.dir_id = (folder.st_dev, folder.st_ino)  # a folder made anew at this path is not ours
        # opened once: stopping takes the lock even after the data dir was deleted, never making it again
        self.lock = open_private(self.data_dir / LOCK)
        self.store = open_store(self.settings.store_url, max_attempts=self.settings.max_attempts)
        auth = self._auth()
        address = connect(self.settings)  # a local Ray on 127.0.0.1, reaped if this process is killed
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: self.stopping.set())
        self.pool = Pool(self.settings, self.store, self.model, self.pipeline)
        workers = self.pool.ensure()
        me = psutil.Process()
        self.record = {
            "address": address, "pid": me.pid, "pid_started": started(me.pid),
            "session_dir": ray._private.worker.global_worker.node.get_session_dir_path(),
            "model": self.model, "models": known_models(), "workers": len(workers),
            "namespace": self.settings.namespace,
            "store": redact_url(self.settings.store_url), "pipeline": self.pipeline.model_dump(mode="json"),
            "idle_timeout_s": self.settings.runtime_idle_s, "started_at": time.time(),
            "idle_since": time.time(), "drivers": 0, "busy_workers": 0, "log": str(self.data_dir / LOG),
            "store_gone_s": min(self.settings.runtime_store_gone_s, self.settings.runtime_idle_s),
            "store_down_since": None, **auth,
        }
        _write_json(self.data_dir / RECORD, self.record)
        log.info("local runtime up at %s: %d %s worker(s), idle timeout %g s, store gone after %g s", address,
                 len(workers), self.model, self.settings.runtime_idle_s, self.record["store_gone_s"])
        self._watch()
        return 0

    def _auth(self) -> dict[str, str]:
        """Token auth with a fresh token of this runtime's own (Ray's children inherit the variables)."""
        set_ray_env(RAY_AUTH_TOKEN=None)
        if ray_auth_disabled():
            set_ray_env(RAY_AUTH_TOKEN_PATH=None)
            return {"auth": "disabled"}
        path = self.data_dir / TOKEN
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        set_ray_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
        _reload_ray_auth()
        return {"auth": "token", "auth_token_path": str(path)}

    def _drivers(self) -> int:
        """Attached drivers other than this one (Ray knows them; the store plays no part)."""
        import ray

        return sum(1 for j in ray._private.state.state.job_table() if not j["IsDead"] and j["DriverPid"] != os.getpid())

    def _workers(self) -> tuple[int, int]:
        """(busy workers, jobs done so far by all workers), from the store."""
        rows = self.store.workers()
        busy = sum(1 for r in rows if r.get("state") in ("busy", "loading"))
        return busy, sum(int(r.get("jobs_done") or 0) for r in rows)

    def _watch(self) -> None:
        """Until SIGTERM; or idle for runtime_idle_s (no driver attached, no worker busy, no job finished);
        or, with no driver attached, the store unreachable for store_gone_s; or the data dir gone."""
        idle_s = self.settings.runtime_idle_s
        tick = min(1.0, max(0.1, self.record["store_gone_s"] / 10))  # store_gone_s <= idle_s
        done_before = None
        while not self.stopping.wait(tick):
            if not self._dir_is_ours():
                self._stop(f"the data dir {self.data_dir} is gone")
                return
            try:
                drivers = self._drivers()
                busy, done = self._workers()
            except StoreError as exc:  # raised by the store only: `drivers` is known
                if self._store_out(exc, drivers):
                    return
                continue
            except Exception:  # Ray's GCS restarting, an odd reply: no verdict on this tick
                log_repeating(log, logging.ERROR, "could not read the runtime's activity", exc_info=True)
                continue
            self._store_back()
            active = drivers or busy or (done_before is not None and done != done_before)
            done_before = done
            now = time.time()
            idle_since = None if active else (self.record["idle_since"] or now)
            self._update(idle_since=idle_since, drivers=drivers, busy_workers=busy)
            if idle_since is not None and now - idle_since >= idle_s:
                if self._stop(f"idle for {now - idle_since:.0f} s with no handle attached", unless_attached=True):
                    return
                self._update(idle_since=None)
        self._stop("told to stop")

    def _store_out(self, exc: StoreError, drivers: int) -> bool:
        """Note the outage in the record; stop (True) once it has lasted store_gone_s with no handle
        attached. An outage that ends sooner changes nothing: the idle clock stays where it was."""
        if self.down_at is None:
            self.down_at = time.monotonic()
            self._update(store_down_since=time.time())
        log_repeating(log, logging.WARNING, "store unreachable: %s", exc)
        down_s = time.monotonic() - self.down_at
        if drivers or down_s < self.record["store_gone_s"]:
            return False
        return self._stop(f"store unreachable for {down_s:.0f} s with no handle attached", unless_attached=True)

    def _store_back(self) -> None:
        if self.down_at is not None:
            log_repeating(log, logging.INFO, "store reachable again after %.1f s", time.monotonic() - self.down_at)
            self.down_at = None
            self._update(store_down_since=None)

    def _update(self, **fields: Any) -> None:
        """Rewrite the record if `fields` change it (not at all once the data dir is gone)."""
        if all(self.record.get(k) == v for k, v in fields.items()):
            return
        self.record.update(fields)
        try:
            _write_json(self.data_dir / RECORD, self.record)
        except OSError:
            if self._dir_is_ours():
                raise  # else: deleted under us; the next tick stops

    def _dir_is_ours(self) -> bool:
        try:
            folder = os.stat(self.data_dir)
        except OSError:
            return False
        return (folder.st_dev, folder.st_ino) == self.dir_id

    def _stop(self, why: str, unless_attached: bool = False) -> bool:
        """Stop (True), or not if `unless_attached` and a handle is attached. Under the lock: no handle is
        between reading the record and joining, and none joins until this runtime is gone."""
        with _flocked(self.lock):
            if unless_attached and self._drivers():
                return False
            log.info("%s: stopping", why)
            self._shutdown()
            return True

    def _shutdown(self) -> None:
        import ray

        self._remove_own(RECORD)
        try:
            self.pool.shutdown()
        except Exception:
            log.exception("could not stop the pool cleanly")
        ray.shutdown()  # ends the Ray processes this driver started
        self._remove_own(TOKEN)
        self.store.close()
        log.info("local runtime stopped")

    def _remove_own(self, name: str) -> None:
        if self._dir_is_ours():  # a data dir made anew at this path holds another runtime's files
            (self.data_dir / name).unlink(missing_ok=True)


def serve(data_dir: Path) -> int:
    """The daemon's main: read the spec from stdin, run until idle or told to stop."""
    os.umask(PRIVATE_UMASK)  # inherited by its Ray and workers
    # Ray's own logs and the workers' output (the session dir) rotate at the cap of the runtime's log
    default_ray_env(RAY_ROTATION_MAX_BYTES=str(LOG_MAX_BYTES), RAY_ROTATION_BACKUP_COUNT=str(LOG_BACKUPS))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[RotatingLog(Path(data_dir) / LOG, capture_std=True)])
    spec = json.loads(sys.stdin.read())
    settings = Settings(**{**spec["settings"], "ray_address": None})
    return _Daemon(Path(data_dir), settings, spec["model"], PipelineConfig(**spec["pipeline"])).run()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m mochi_lab.pool.runtime serve DATA_DIR")
    sys.exit(serve(Path(sys.argv[2])))
