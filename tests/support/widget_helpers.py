"""Drive widget polling synchronously: outside a kernel there is no event loop, so tests step it."""

from __future__ import annotations

import time
import uuid
from typing import Callable


def unique(word: str) -> str:
    """A prompt word no other test uses: the session's store is shared and generate() reuses equal params."""
    return f"{word}-{uuid.uuid4().hex[:8]}"


def drive(poll_once: Callable[[], bool], until: Callable[[], bool], timeout: float = 240.0,
          interval: float = 0.1) -> None:
    """Call a widget's polling step until `until()` holds (what the kernel's poll task would do)."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("widget did not reach the expected state")
        poll_once()
        time.sleep(interval)
