"""The local runtime's files in its data dir, which its handles and its daemon both read: the record
(`runtime.json`: address, pid, model, store, ...), the lock that orders starts, attaches and stops, the log,
and Ray's auth token.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psutil

from mochi_lab.pool.reaper import started
from mochi_lab.private import open_private, private_dir

RECORD, LOCK, LOG, TOKEN = "runtime.json", "runtime.lock", "runtime.log", "ray_auth_token"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write the record whole or not at all."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # readers never see half a record


def read_record(data_dir: Path) -> dict[str, Any] | None:
    """The record as written (alive or not), or None."""
    try:
        return json.loads((Path(data_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def daemon_process(record: dict[str, Any]) -> psutil.Process | None:
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
    proc = daemon_process(record)
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
def flocked(fh: IO) -> Iterator[None]:
    fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel too if this process dies holding it
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    with open_private(private_dir(data_dir) / LOCK) as fh, flocked(fh):
        yield


def reload_ray_auth() -> None:
    """Make this process's Ray read its auth variables again: it caches its config and token (as Ray's own
    `_enable_token_auth` reloads them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


__all__ = ["LOCK", "LOG", "RECORD", "TOKEN", "daemon_process", "flocked", "live_record", "locked", "read_record",
           "reload_ray_auth", "stale_reason", "write_json"]
