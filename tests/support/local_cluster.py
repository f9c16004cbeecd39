"""What the local cluster's test (tests/cluster/test_local_cluster.py) needs:
free ports for cluster/local/up.sh, its env file, and the processes it marked."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import psutil

from tests.support.ports import port_block, port_free

WORKERS = 2  # up.sh's workers in these tests: their port blocks must be free too


def pick_ports() -> tuple[int, int, int]:
    """A Ray port and a Redis port (not 6379/6390) that are free, and the first of up.sh's block of Ray's other
    ports (`--port-base`), free and outside the kernel's ephemeral range: other tests and other clusters may run
    on this machine, and the other tests' servers take their ports from that same stretch (tests/support/ports.py),
    so the block is searched for, never derived from the Ray port."""
    base = port_block(100 * (WORKERS + 2))
    for ray_port in range(6410, 6500, 2):
        if port_free(ray_port) and port_free(ray_port + 1):
            return ray_port, ray_port + 1, base
    raise RuntimeError("no two free ports in a row between 6410 and 6500")


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0]
    return out


def group_pids(group: int) -> set[int]:
    """The processes in process group `group`."""
    return {p.pid for p in psutil.process_iter(["pid"]) if pgid(p.pid) == group}


def marked_pids(state: Path) -> set[int]:
    """Processes up.sh marked as this cluster's (Ray worker processes have process groups of
    their own, so the recorded groups alone would miss the actors)."""
    found = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("MOCHI_LOCAL_CLUSTER") == str(state):
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def logs(state: Path) -> str:
    parts = []
    for log in sorted((state / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)
