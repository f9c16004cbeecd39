"""Drive widget polling synchronously: outside a kernel there is no event loop, so tests step it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable


def unique(word: str) -> str:
    """A prompt word no other test uses: the session's store is shared and generate() reuses equal params."""
    return f"{word}-{uuid.uuid4().hex[:8]}"


def pool_size(cluster) -> int:
    """How many workers the session's pool runs (tests/conftest.py's `mochi`)."""
    return cluster.backend.pool.n


def drive(poll_once: Callable[[], bool], until: Callable[[], bool], timeout: float = 240.0,
          interval: float = 0.1) -> None:
    """Call a widget's polling step until `until()` holds (what the kernel's poll task would do)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("widget did not reach the expected state")
        poll_once()
        time.sleep(interval)


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Await `condition()` on a running loop (a widget's poll task runs meanwhile), failing at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("widget did not reach the expected state")
        await asyncio.sleep(0.01)
