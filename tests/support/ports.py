"""Ports for the servers the tests start: free ones, outside the kernel's ephemeral range.

A port the kernel hands out for `bind(0)` lies in its ephemeral range, where any process's next outgoing
connection may take it before the server that was meant to listen there binds it (a Ray dashboard agent,
which binds seconds after its ports were chosen, can lose its HTTP port so and stays up without it). Outside
that range only listeners take ports, so a port found free here stays free until a test's server binds it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 24000  # above Ray's worker ports (10002-19999) and Ray Client's specific servers (23000-23999)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports, first and last (Linux's default where the kernel does not say)."""
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return first, last
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int) -> bool:
    """Nothing listens on `port` on 127.0.0.1, 127.0.0.2 or any address (Ray binds all three)."""
    for host in ("127.0.0.1", "127.0.0.2", ""):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def port_block(size: int) -> int:
    """The first of `size` free ports in a row, outside the ephemeral range: between LOW and its start, or
    above its end."""
    first, last = ephemeral_range()
    starts = [*range(LOW, first - size + 1), *range(last + 1, 65536 - size + 1)]
    if not starts:
        raise RuntimeError(f"no room for {size} ports outside the kernel's ephemeral range ({first}-{last})")
    for _ in range(200):
        base = random.choice(starts)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} free ports in a row outside the kernel's ephemeral range ({first}-{last})")


def free_port() -> int:
    """One free port."""
    return port_block(1)
