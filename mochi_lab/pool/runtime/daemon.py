"""The local runtime's daemon: owned by no kernel, it runs a Ray on 127.0.0.1 as its own driver and the warm
pool, keeps the record up to date, and stops itself when idle, when its store is gone with no handle attached,
when its data dir is deleted, or on SIGTERM (see `mochi_lab.pool.runtime`). Started as
`python -m mochi_lab.pool.runtime serve DATA_DIR` (`__main__.py`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from mochi_lab.config import Settings, default_ray_env, known_models, ray_auth_disabled, redact_url, set_ray_env
from mochi_lab.logs import LOG_BACKUPS, LOG_MAX_BYTES, RotatingLog, log_repeating
from mochi_lab.model import StoreError
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool.connection import connect
from mochi_lab.pool.driver import Pool
from mochi_lab.pool.reaper import started
from mochi_lab.pool.runtime.files import LOCK, LOG, RECORD, TOKEN, flocked, reload_ray_auth, write_json
from mochi_lab.private import PRIVATE_UMASK, open_private
from mochi_lab.store import open_store

log = logging.getLogger(__name__)


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
        write_json(self.data_dir / RECORD, self.record)
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
        reload_ray_auth()
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
            write_json(self.data_dir / RECORD, self.record)
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
        with flocked(self.lock):
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


__all__ = ["serve"]
