"""Polling on the kernel's event loop.

Widgets must update while the kernel is idle, and ipykernel 7.0.x dropped widget messages sent from
threads. So polling is an asyncio task on the loop that runs the kernel (ipykernel executes cells
inside it): between awaits the kernel is free to run cells, and trait changes leave from the main
thread. Outside a kernel (tests, scripts) there is no running loop; callers then drive `step`.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from mochi_lab.looptask import LoopTask

DEFAULT_INTERVAL_S = 0.4


class Poller(LoopTask):
    """Calls `step()` every `interval` seconds (or `delay()`, where given) until it returns False or `stop()`
    is called.

    `step` runs on the event loop, so it must be quick (a store read per job, a few trait sets).
    """

    def __init__(self, step: Callable[[], bool], interval: float = DEFAULT_INTERVAL_S,
                 delay: Callable[[], float] | None = None):
        self._step = step
        self.interval = interval
        self._delay = delay  # the seconds to the next step, when they vary (a job's `Cadence`)
        self.errors = 0  # consecutive step failures (a store briefly unreachable)

    def start(self) -> bool:
        """Schedule polling on the running event loop; returns False when there is none."""
        return self.running or self._schedule("mochi_lab widget poll")

    async def _run(self) -> None:
        while True:
            if not self._tried(self._step, "widget poll"):
                return
            await asyncio.sleep(self.interval if self._delay is None else self._delay())
