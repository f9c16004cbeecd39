"""Following jobs until they end: the one place that reads a job again and again.

`Follower` follows one job for every view of it (`Job.wait`, the live display, a Studio's card): its
state, its place in the queue while queued, its latest preview while running, the notes a snapshot
cannot give (a lost worker, a silent one), and whether it was deleted; it rides out a brief outage of
the store or the gateway. There is one follower per job and backend in a process, so two views of one
job read it once and show the same step. `GroupFollower` follows many jobs with one listing per tick
(`Experiment.wait`). `Cadence` is the rule of how often to read, which the gateway's per-job progress
hub shares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from mochi_lab.looptask import MAX_ERRORS, LoopTask
from mochi_lab.model import DONE, FINISHED, QUEUED, JobNotFound, JobRecord

if TYPE_CHECKING:
    from mochi_lab.client.backend import Backend

log = logging.getLogger(__name__)

NEAR_END_STAGES = frozenset({"decoding", "encoding"})  # a job's last stages: its end may come any moment
START_S = 2.0  # a job's first seconds: a short job may end in them
QUEUE_EVERY_S = 1.0  # how often a queued job's place is asked for (one read of the queue)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a job is read: every `every_s`, and every `near_s` (default a fifth of it) where its end
    may be near, so a view or a `wait` sees the end soon after it happens: in the first `START_S` seconds
    of following (short jobs) and in its last stages (`NEAR_END_STAGES`)."""

    every_s: float
    near_s: float | None = None

    def __post_init__(self) -> None:
        if not self.every_s > 0:
            raise ValueError(f"every_s must be a positive number of seconds, got {self.every_s!r}")
        if self.near_s is not None and not 0 < self.near_s <= self.every_s:
            raise ValueError(f"near_s must be in (0, every_s={self.every_s}], got {self.near_s!r}")

    @staticmethod
    def near_end(stage: Any, followed_s: float) -> bool:
        """Whether the end may be near: a job followed for under START_S, or in its last stages."""
        return followed_s < START_S or stage in NEAR_END_STAGES

    def delay(self, stage: Any, followed_s: float) -> float:
        """Seconds until the next read of a job in `stage`, followed for `followed_s` seconds."""
        if self.near_end(stage, followed_s):
            return self.near_s if self.near_s is not None else self.every_s / 5
        return self.every_s


WAIT = Cadence(0.1, 0.02)  # a blocking wait in this process: a state read costs well under a millisecond
LIVE = Cadence(0.5, 0.1)  # a live view on the kernel's event loop, which must stay free for cells
GROUP = Cadence(1.0, 0.2)  # many jobs, one listing per tick (an experiment)


class Followable(Protocol):
    """What a follower reads: the public `Job` handle (widgets are also given stand-ins with this surface)."""

    @property
    def id(self) -> str: ...
    @property
    def record(self) -> JobRecord: ...
    def refresh(self) -> JobRecord: ...
    def queue_position(self) -> dict[str, Any] | None: ...


Listener = Callable[["Follower"], None]


class Follower(LoopTask):
    """One job, followed for all its views until it ends. Get it with `follower_of(job)`, not directly.

    `step()` reads the job once and tells the listeners; `start()` keeps doing so from one asyncio task on
    the running loop (the kernel's), while anyone listens; `watch()` is the blocking form (`Job.wait`),
    pushed by the backend where it can. Views draw from `record`, `position`, `preview`, `notes()` and
    `gone`, never from reads of their own."""

    def __init__(self, job: Followable, *, cadence: Cadence = LIVE):
        from mochi_lab.display.notes import RetryTracker  # pure: records in, lines out

        self.job = job
        self.cadence = cadence
        self.record: JobRecord = job.record
        self.tracker = RetryTracker()
        self.tracker.observe(self.record)
        self.position: dict[str, Any] | None = None  # Job.queue_position(), while queued
        self._position_at = -float("inf")
        self.preview: tuple[int, bytes] | None = None  # (step, WebP) of the running job's latest preview
        self.gone = False  # deleted (from another kernel, the history browser)
        self.errors = 0  # failed reads in a row
        self.reads = 0  # reads of the job (tests count them)
        self.started = time.monotonic()
        self.handles: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every handle of the job, kept in step
        self._listeners: list[Listener] = []
        self._loop_thread: int | None = None
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.gone or (isinstance(self.record.status, str) and self.record.status in FINISHED)

    @property
    def active(self) -> bool:
        """Still worth reading: not ended, not gone, not given up on."""
        return not self.finished and self.errors < MAX_ERRORS

    def notes(self) -> list[str]:
        """The lines a view shows beside the record: a lost or silent worker, the place in the queue."""
        from mochi_lab.display.notes import queue_note

        r = self.record
        lines = list(self.tracker.notes(r))
        if r.status == QUEUED and (line := queue_note(self.position)):
            lines.append(line)
        return lines

    def delay(self, every_s: float | None = None) -> float:
        """Seconds until the next read: this follower's `Cadence`, or one of `every_s` (a view's own pace)."""
        cadence = self.cadence if every_s is None else Cadence(every_s)
        return cadence.delay(self.record.stage, time.monotonic() - self.started)

    # -- listeners ---------------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners and not self._in_task():  # (the task itself ends at its next turn)
            self.stop()  # nobody to show it to: stop reading

    def _tell(self) -> None:
        loop = self._task.get_loop() if self._task is not None else None
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            # read in another thread (a blocking wait): views draw on the loop, as widgets must
            loop.call_soon_threadsafe(self._tell_now)
        else:
            self._tell_now()

    def _tell_now(self) -> None:
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:  # one broken view must not stop the others
                log.warning("a view of job %s failed to draw", self.record.id, exc_info=True)

    # -- reading -----------------------------------------------------------------
    def observe(self, r: JobRecord) -> None:
        """Take a state read elsewhere (a pushed event): the notes, the place in the queue, the preview."""
        with self._lock:
            self.record = r
            for handle in (self.job, *self.handles):
                _sync(handle, r)
            self.tracker.observe(r)
            if r.status == QUEUED:
                self._place()
            step = (r.live or {}).get("preview_step") if isinstance(r.live, dict) else None
            if r.status == DONE:
                self.preview = None  # the video takes its place
            elif step is not None and (self.preview is None or self.preview[0] != step):
                self._preview(step)
        self._tell()

    def _place(self) -> None:
        now = time.monotonic()
        if now - self._position_at < QUEUE_EVERY_S:
            return
        self._position_at = now
        ask = getattr(self.job, "queue_position", None)
        try:
            self.position = ask() if ask is not None else None
        except Exception:  # a nicety: the job shows without it (a deleted job shows at the next read)
            self.position = None

    def replace_in_queue(self) -> None:
        """Ask for the place in the queue at the next read (another job was queued meanwhile)."""
        self._position_at = -float("inf")

    def _preview(self, step: Any) -> None:
        try:
            data = self.job.preview  # type: ignore[attr-defined]
        except Exception:  # a nicety: the job shows without it
            return
        if data:
            self.preview = (int(step), bytes(data))

    def step(self) -> bool:
        """One read of the job, told to every listener; returns whether it is still worth reading."""
        if not self.active:
            return False
        try:
            self.reads += 1
            r = self.job.refresh()
            self.errors = 0
        except JobNotFound:
            self.gone = True
            self._tell()
            return False
        except Exception:  # keep reading through a brief outage of the store or gateway, not forever
            self.errors += 1
            log.warning("reading job %s failed (%d in a row)", self.record.id, self.errors, exc_info=True)
            return self.active
        self.observe(r)
        return self.active

    def start(self) -> bool:
        """Keep reading on the running event loop (one task, however many views); False without a loop.
        While it runs (`running`), views only listen."""
        if self.running:
            return True
        if not self.active or not self._schedule(f"mochi_lab follow {self.record.id}"):
            return False
        self._loop_thread = threading.get_ident()
        return True

    def _in_task(self) -> bool:
        try:
            return self._task is not None and asyncio.current_task() is self._task
        except RuntimeError:  # no running loop in this thread
            return False

    async def _run(self) -> None:
        while self.active and self._listeners:
            await asyncio.sleep(self.delay())
            if not self._listeners or not self.step():
                return

    def watch(self, backend: "Backend", timeout: float | None = None) -> Iterator[JobRecord]:
        """Block until the job ends (TimeoutError after `timeout` s), yielding each state the backend gives:
        pushed by a gateway, polled at `WAIT` in this process; each one observed and told to the listeners."""
        for r in backend.watch(self.record.id, timeout):
            self.observe(r)
            yield r


def _sync(job: Any, r: JobRecord) -> None:
    """Keep the handle's last state in step with the follower's (what `job.record` and reprs show)."""
    if getattr(job, "_record", None) is not None:
        job._record = r


_BY_ID: "weakref.WeakValueDictionary[tuple[int, str], Follower]" = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def follower_of(job: Followable) -> Follower:
    """The job's follower: one per job and backend in this process, shared by every handle and view of it."""
    with _REGISTRY_LOCK:
        found = getattr(job, "_follower", None)
        if isinstance(found, Follower) and not found.gone:
            found.errors = 0 if found.errors >= MAX_ERRORS else found.errors  # a new view tries again
            return found
        backend = getattr(job, "_backend", None)
        key = (id(backend), job.id) if backend is not None else None
        found = _BY_ID.get(key) if key is not None else None
        if found is None or found.gone:
            found = Follower(job)
            if key is not None:
                _BY_ID[key] = found
        elif found.job is not job:
            found.handles.add(job)
        job._follower = found  # type: ignore[attr-defined]  # held by the handle, gone with it
        return found


class GroupFollower(LoopTask):
    """Many jobs followed with one listing per tick (`Experiment.wait`, a live sweep table), never one read
    per job. `list_records()` is that listing; a job missing from it was deleted. `step()` reads once and
    returns whether any job is still queued or running."""

    def __init__(self, list_records: Callable[[], Iterable[JobRecord]], records: dict[str, JobRecord | None], *,
                 cadence: Cadence = GROUP):
        self._list = list_records
        self.records = dict(records)  # key -> the job's latest record (None: none, or deleted)
        self.cadence = cadence
        self.started = time.monotonic()
        self.listings = 0  # listings read (tests count them)
        self.errors = 0  # failed listings in a row
        self._listeners: list[Callable[[GroupFollower], None]] = []

    @property
    def pending(self) -> dict[str, JobRecord]:
        return {k: r for k, r in self.records.items() if r is not None and not r.finished}

    def step(self) -> bool:
        """One listing; the listeners are told. Returns whether any job is still queued or running."""
        pending = self.pending
        if not pending:
            return False
        self.listings += 1
        listed = {r.id: r for r in self._list()}
        for key, r in pending.items():
            self.records[key] = listed.get(r.id)  # finished runs are not looked up again
        for listener in list(self._listeners):
            listener(self)
        return bool(self.pending)

    def listen(self, listener: Callable[["GroupFollower"], None]) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def start(self) -> bool:
        """Keep listing on the running event loop (the kernel's) until no job is pending; False without a loop."""
        if self.running:
            return True
        return bool(self.pending) and self._schedule("mochi_lab follow jobs")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.delay())
            if not self._tried(self.step, "listing the followed jobs"):
                return

    def delay(self) -> float:
        """`Cadence.delay` for the job nearest its end."""
        followed = time.monotonic() - self.started
        return min((self.cadence.delay(r.stage, followed) for r in self.pending.values()),
                   default=self.cadence.every_s)

    def follow(self, timeout: float | None = None, *, on_tick: Callable[[], None] | None = None) -> None:
        """Block until no job is queued or running (TimeoutError after `timeout` s); `on_tick` after each read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if on_tick is not None:
                on_tick()
            if not self.pending:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(self.pending)} jobs unfinished after {timeout}s")
            wait = self.delay()
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
            self.step()


__all__ = ["GROUP", "LIVE", "WAIT", "Cadence", "Follower", "GroupFollower", "follower_of"]
