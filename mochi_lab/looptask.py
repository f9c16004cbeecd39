"""A task on the running event loop: how the notebook's live parts (a job's follower, a widget's poller)
keep reading while the kernel is idle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_ERRORS = 20  # failed reads in a row before a reader gives up (a brief outage is ridden out)


class LoopTask:
    """At most one asyncio task doing `_run` on the running event loop: the kernel's, which runs cells
    between awaits and sends widget messages from its own thread. Without a running loop (a script, a
    test) nothing is scheduled, and callers step by hand. Subclasses say when to `start`."""

    _task: asyncio.Task | None = None
    errors = 0  # failed steps in a row

    @property
    def running(self) -> bool:
        """Whether the task is scheduled or running."""
        return self._task is not None and not self._task.done()

    def start(self) -> bool:
        raise NotImplementedError

    async def _run(self) -> None:
        raise NotImplementedError

    def _schedule(self, name: str) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._task = loop.create_task(self._run(), name=name)
        return True

    def _tried(self, step: Callable[[], bool], what: str) -> bool:
        """`step()`, riding out a brief outage: a failure is logged and counted (`errors`), and ends the task
        after MAX_ERRORS in a row. Returns whether to go on."""
        try:
            more = step()
        except Exception:
            self.errors += 1
            log.warning("%s failed (%d in a row)", what, self.errors, exc_info=True)
            return self.errors < MAX_ERRORS
        self.errors = 0
        return more

    def stop(self) -> None:
        if self.running:
            self._task.cancel()
        self._task = None

    async def wait(self, timeout: float | None = None) -> None:
        """Await the end without blocking the loop (top-level `await` in a cell)."""
        if not self.start():
            return
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait_for(asyncio.shield(task), timeout)
