"""Progress as server-sent events (GET /events/{id}): one store poller per job, fanned out to every listener."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from mochi_lab.client.direct import DirectBackend
from mochi_lab.client.follow import Cadence
from mochi_lab.gateway import wire
from mochi_lab.gateway.door import AUTHED, ApiError, Door
from mochi_lab.gateway.wire import errors, job_json
from mochi_lab.logs import log_repeating
from mochi_lab.model import FINISHED, RUNNING, JobNotFound, StoreError

log = logging.getLogger("mochi_lab.gateway")


class _Watch:
    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.cond = asyncio.Condition()
        self.listeners = 0
        self.done = False
        self.task: asyncio.Task | None = None


_LOGGED = ("status", "stage", "step", "total_steps", "message", "attempts", "live")


def _signature(view: dict[str, Any]) -> tuple:
    # the live figures too: while a job decodes or encodes, its worker writes them again (the ETA counting down)
    # with its stage and step unchanged
    return tuple(view.get(k) for k in ("status", "stage", "step", "attempts", "live"))


class ProgressHub:
    """Every change of (status, stage, step, live figures) of a job, in order, to every listener of that job.

    One poller per (account, job) reads the store every `poll_s` while anyone listens and keeps the
    changes it saw; each listener starts at the latest one and reads on at its own pace.

    The running states come from the store's progress log (`Store.progress_since`), so a step shorter
    than one poll is still delivered; a backend without a store (tests) is polled for its latest state.
    """

    def __init__(self, poll_s: float = 0.05, max_s: float = 6 * 3600.0, keepalive_s: float = 15.0):
        self.poll_s, self.max_s, self.keepalive_s = poll_s, max_s, keepalive_s
        self.cadence = Cadence(poll_s)
        self._watches: dict[tuple[str, str], _Watch] = {}

    def pollers(self) -> int:
        return sum(1 for w in self._watches.values() if not w.done)

    async def listen(self, backend: DirectBackend, job_id: str) -> AsyncIterator[dict[str, Any] | None]:
        """Job JSONs as they change (None: nothing new for `keepalive_s`); ends after a finished state."""
        key = (backend.account, job_id)
        watch = self._watches.get(key)
        if watch is None or watch.done:
            watch = self._watches[key] = _Watch()
            watch.task = asyncio.ensure_future(self._poll(key, watch, backend, job_id))
        watch.listeners += 1
        i = max(len(watch.history) - 1, 0)
        try:
            while True:
                idle = False
                async with watch.cond:
                    try:
                        await asyncio.wait_for(watch.cond.wait_for(lambda: len(watch.history) > i or watch.done),
                                               self.keepalive_s)
                    except asyncio.TimeoutError:
                        idle = True
                if idle:  # yield outside the lock: a slow listener must never hold up the poller
                    yield None
                    continue
                while i < len(watch.history):
                    i += 1
                    yield watch.history[i - 1]
                if watch.done and i >= len(watch.history):
                    return
        finally:
            watch.listeners -= 1

    async def _poll(self, key: tuple[str, str], watch: _Watch, backend: DirectBackend, job_id: str) -> None:
        reader = getattr(getattr(backend, "store", None), "progress_since", None)
        last: tuple | None = None
        seq, first = -1, True
        started = time.monotonic()
        deadline = started + self.max_s
        failures = 0

        async def emit(view: dict[str, Any]) -> None:
            nonlocal last
            if _signature(view) == last:
                return
            last = _signature(view)
            async with watch.cond:
                watch.history.append(view)
                watch.cond.notify_all()

        try:
            while time.monotonic() < deadline and watch.listeners > 0:
                try:
                    # the log before the record: a state the worker writes between the two reads is then newer
                    # than every logged one, never older (a claim after the read of a queued record would
                    # otherwise put "queued" after the job's first running state)
                    entries = [] if reader is None else await asyncio.to_thread(reader, backend.account, job_id, seq)
                    record = await asyncio.to_thread(backend.get, job_id)
                    failures = 0
                except JobNotFound:  # deleted while watched
                    return
                except StoreError as exc:
                    failures += 1
                    log_repeating(log, logging.WARNING, "progress poll of %s failed (%d): %s", job_id, failures,
                                  type(exc).__name__)
                    await asyncio.sleep(min(2.0, self.poll_s * 2 ** failures))
                    continue
                view = job_json(record)
                if first:  # a listener joining late starts at the job's state now, not its history
                    entries, first = ([] if record.status in FINISHED else entries[-1:]), False
                for entry in entries:  # in order
                    seq = max(seq, int(entry.get("seq", seq)))
                    await emit({**view, **{k: entry[k] for k in _LOGGED if k in entry}})
                if reader is None or record.status != RUNNING:  # the log has the running states
                    await emit(view)
                if record.status in FINISHED:
                    return
                # the clients' rule: faster where the end may be near, so `job.result()` sees it soon
                await asyncio.sleep(self.cadence.delay(record.stage, time.monotonic() - started))
        finally:
            async with watch.cond:
                watch.done = True
                watch.cond.notify_all()
            if self._watches.get(key) is watch:
                del self._watches[key]

    async def close(self) -> None:
        for watch in list(self._watches.values()):
            if watch.task is not None:
                watch.task.cancel()


class _CountedStream(StreamingResponse):
    """A stream that gives its slot back when it ends, however it ends."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


_STREAM = {200: {"description": "`event: progress` with a Job as `data:` per change, the last one finished; "
                                "`: keepalive` comments while nothing changes",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def router(door: Door, progress: ProgressHub) -> APIRouter:
    api = APIRouter(route_class=door.route_class(), tags=["jobs"])
    user_backend = door.user_backend()
    streams: dict[str, int] = {}  # open event streams per account, in this process

    def stream_closed(account: str) -> None:
        streams[account] -= 1
        if not streams[account]:
            del streams[account]

    @api.get(wire.EVENTS[1], response_class=StreamingResponse, responses={**_STREAM, **errors(*AUTHED, 404, 422)})
    async def events(job_id: str, backend: DirectBackend = Depends(user_backend)):
        """The job's progress, pushed: at most `max_event_streams` open per account (429 past it)."""
        job_id = door.job_id(job_id)
        await run_in_threadpool(backend.get, job_id)  # 404 before the stream starts
        account, limit = backend.account, door.config.max_event_streams
        if streams.get(account, 0) >= limit:
            raise ApiError(429, "quota", f"account {account} has {streams[account]} event streams open; the limit is "
                                         f"max_event_streams={limit} (close one first)")
        streams[account] = streams.get(account, 0) + 1

        async def stream():
            async for item in progress.listen(backend, job_id):
                if item is None:
                    yield ": keepalive\n\n"
                else:
                    yield f"event: progress\ndata: {json.dumps(item)}\n\n"

        return _CountedStream(stream(), release=lambda: stream_closed(account), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


__all__ = ["ProgressHub", "router"]
