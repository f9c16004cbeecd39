"""Helpers for the fault tests: a worker in a thread of the test process whose steps can hang; a process tree's
life and listening sockets; nodes taken out of a Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mochi_lab.worker import loop as worker_mod
from tests.support.store_helpers import RedisServer  # noqa: F401


def alive(pid: int, created: float) -> bool:
    """Whether that very process (pid and start time: a reused pid is another process) still runs."""
    import psutil

    from mochi_lab.pool.reaper import started

    try:
        return started(pid) == created and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening(procs: list[Any]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of these psutil processes (those gone meanwhile skipped)."""
    import psutil

    found = []
    for proc in procs:
        try:
            found += [(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1: a dual-stack socket)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


class HungRunner:
    """Wraps a runner so that a denoising step never returns while `stuck()` is true (a hung kernel, which
    ignores everything, a cancel included). A job that must be running while a test acts is held at a gate
    instead (tests/support/gate.py)."""

    def __init__(self, runner: Any, stuck: Callable[[], bool]) -> None:
        self._runner, self.stuck = runner, stuck

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def generate(self, params: Any, on_step: Any = None, preview: Any = None) -> Any:
        def hung(step: int, total: int) -> None:
            while self.stuck():
                time.sleep(0.05)
            if on_step is not None:
                on_step(step, total)

        return self._runner.generate(params, hung, preview=preview)


def hung_steps(monkeypatch: Any, stuck: Callable[[], bool]) -> None:
    """Workers loaded from now on (in this process) run their steps through a HungRunner."""
    real = worker_mod.load_runner

    def load(*args: Any, **kwargs: Any) -> Any:
        return HungRunner(real(*args, **kwargs), stuck)

    monkeypatch.setattr(worker_mod, "load_runner", load)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def remove_nodes(cluster: Any, nodes: list[Any], timeout: float = 60.0) -> None:
    """Remove these nodes of a `ray.cluster_utils.Cluster` (those still in it) and wait until Ray reports
    them dead: until then their GPUs still count in `ray.cluster_resources()`, and a pool sized from it
    would ask for actors no node can host."""
    import ray

    ids = {node.node_id for node in nodes}
    for node in nodes:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)
    wait_for(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] in ids), timeout,
             f"Ray to report {len(ids)} removed node(s) dead", every=0.1)
