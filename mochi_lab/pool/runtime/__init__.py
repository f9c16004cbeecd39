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

This module is the handles' side (attach, status, stop); `files` holds what both sides read (the record, the
lock, the token), `daemon` the daemon.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from mochi_lab.config import Settings, child_env, known_models, redact_url, set_ray_env
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool.connection import connect, import_ray
from mochi_lab.pool.runtime.files import (
    LOCK,
    LOG,
    RECORD,
    TOKEN,
    daemon_process,
    live_record,
    locked,
    read_record,
    reload_ray_auth,
    stale_reason,
)
from mochi_lab.private import open_private

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # a cold Ray start on a loaded laptop can take a minute (Ray retries once)
STOP_TIMEOUT_S = 120.0
PKG_ROOT = Path(__file__).resolve().parents[3]  # the daemon imports this very copy of mochi_lab

_attached: str | None = None  # the runtime address this process joined last


class RuntimeMismatch(RuntimeError):
    """The running local runtime uses another store, namespace or pipeline than this handle asks for, or does
    not know its model (or knows that name as another checkpoint)."""


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
    with locked(settings.data_dir):
        record = read_record(settings.data_dir)
        why = stale_reason(record) if record is not None else None
        if record is None or why is not None:
            if record is not None:
                log.warning("replacing the stale local runtime record (%s)", why)
                broken = daemon_process(record)
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
    reload_ray_auth()


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
    proc = daemon_process(record)
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
    proc = daemon_process(record) if record else None
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


__all__ = ["LOCK", "LOG", "RECORD", "TOKEN", "RuntimeMismatch", "attach", "check_compatible", "live_record",
           "processes", "read_record", "stale_reason", "status", "stop"]
