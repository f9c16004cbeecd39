"""`CardStack`: the job cards of a Studio or a History browser, polled on the kernel's event loop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ipywidgets as W

from ._poll import DEFAULT_INTERVAL_S, Poller
from .job_card import JobCard

if TYPE_CHECKING:
    from mochi_lab.client.job import Job


class CardStack(W.VBox):
    """Newest card first. Polls while any card's job is queued or running, then stops by itself."""

    def __init__(self, *, download_dir: Path | None = None, interval: float = DEFAULT_INTERVAL_S,
                 on_finish: Callable[[JobCard], None] | None = None):
        super().__init__()
        self.download_dir = download_dir
        self.poller = Poller(self.poll_once, interval, delay=self.delay)
        self.on_finish = on_finish  # e.g. the history browser re-lists when a re-run ends
        self.on_change: Callable[[], None] | None = None  # a card added, removed, or a job's status changed

    @property
    def cards(self) -> list[JobCard]:
        return list(self.children)

    @property
    def jobs(self) -> "list[Job]":
        return [c.job for c in self.children]

    def add(self, job: "Job") -> JobCard:
        card = JobCard(job, download_dir=self.download_dir, on_clear=self.remove)
        for other in self.children:
            other.replace_in_queue()  # a new job may change their count: ask again at the next poll
        self.children = (card, *self.children)
        if not card.finished:
            self.poller.start()  # no-op outside a running event loop: the caller drives poll_once
        if self.on_change is not None:
            self.on_change()
        return card

    def remove(self, card: JobCard) -> None:
        """Take a card off the stack and close it (its job is not touched: it keeps running)."""
        self.children = tuple(c for c in self.children if c is not card)
        card.close()
        if self.on_change is not None:
            self.on_change()

    def clear_finished(self) -> int:
        """Remove the cards of jobs that have ended; returns how many went."""
        done = [c for c in self.children if c.finished or c.gone]
        for card in done:
            self.remove(card)
        return len(done)

    def delay(self) -> float:
        """Seconds to the next poll: every `interval`, faster for a job whose end may be near (its follower's
        `Cadence` rule, at this stack's interval)."""
        every = self.poller.interval
        return min((c.follower.delay(every) for c in self.cards if not (c.finished or c.gone)), default=every)

    def poll_once(self) -> bool:
        """One polling step: each unfinished card's job read once by its follower. Returns whether any is
        still active."""
        if self.comm is None:  # the widget was closed: stop reading the store for it
            return False
        active = False
        changed = False
        for card in self.cards:
            if card.finished or card.gone:
                continue
            before = card.record.status
            still = card.poll()
            changed = changed or card.record.status != before or not still
            if not still and self.on_finish is not None:
                self.on_finish(card)
            active = active or still
        if changed and self.on_change is not None:
            self.on_change()
        return active

    async def wait(self, timeout: float | None = None) -> None:
        """Await every card's job (top-level `await` in a cell), leaving the kernel free meanwhile."""
        await self.poller.wait(timeout)

    def close(self) -> None:
        self.poller.stop()
        super().close()


class HasCardStack:
    """For widgets whose jobs live in `self.stack`: polling, waiting and closing go through it."""

    stack: CardStack

    def poll_once(self) -> bool:
        return self.stack.poll_once()

    async def wait(self, timeout: float | None = None) -> None:
        """Await the jobs started here without blocking the kernel (`await widget.wait()` in a cell)."""
        await self.stack.wait(timeout)

    def close(self) -> None:
        self.stack.close()
        super().close()
