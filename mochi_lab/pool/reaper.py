"""Cleans up a local Ray after the process that started it dies, however it dies.

`ray.init()` with no address starts Ray's processes as children of the calling process. When that
process is SIGKILLed (a kernel killed, a laptop closed), Ray's dashboard and runtime-env agents
outlive it (~250 MB each time). The embedded default therefore starts this small watcher beside its
Ray: it waits for the owner to die, then ends every process of that Ray session.

    python -m mochi_lab.pool.reaper OWNER_PID SESSION_DIR
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 3.0  # SIGTERM first; what is left after this gets SIGKILL
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def started(pid: int) -> float | None:
    """When process `pid` started (None: no such process), comparable across processes and hours.

    On Linux it is the kernel's count since boot. psutil's create_time adds a boot time derived from the
    wall clock, which clock adjustments move by whole seconds, so two processes could read one process's
    start a second apart and take it for a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19]) / _TICKS
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):  # no /proc here
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None


def start(owner_pid: int, session_dir: str) -> subprocess.Popen:
    """Start the watcher for `owner_pid`'s Ray session, in its own session so the owner's death spares it."""
    return subprocess.Popen(
        [sys.executable, "-m", "mochi_lab.pool.reaper", str(owner_pid), session_dir],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def session_processes(session_dir: str, known: dict[int, float]) -> list[psutil.Process]:
    """Processes of the session: any whose command line names its folder, and every one seen below the
    owner while it lived (Ray's workers rename themselves), matched by start time against pid reuse."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = " ".join(proc.info["cmdline"] or ())
        if session_dir in cmdline or (proc.pid in known and known[proc.pid] == started(proc.pid)):
            found.append(proc)
    return found


def watch(owner_pid: int, session_dir: str) -> int:
    born = started(owner_pid)
    known: dict[int, float] = {}
    while born is not None:
        try:
            owner = psutil.Process(owner_pid)
            if started(owner_pid) != born or owner.status() == psutil.STATUS_ZOMBIE:
                break
            children = owner.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        known.update({c.pid: t for c in children if (t := started(c.pid)) is not None})
        time.sleep(POLL_S)
    procs = session_processes(session_dir, known)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), sys.argv[2]))
