"""The pool controller: sizes the worker pool from the queue, with one owner at a time.

It runs in the gateway (see docs/how-to/operations.md, "The pool controller"): the gateway already holds the store's credentials
and the pool, while the Ray head holds neither by design. Gateway replicas each run one; a lease in the
store (`Store.lead`) lets exactly one of them act, and another takes over when its lease lapses.

Each tick: desired = clamp(ceil((queued + running jobs) / target_per_worker), min_workers, max_workers).
Growing starts actors at once; an actor that cannot be placed stays pending, and its `num_gpus` demand
is what the Ray autoscaler (KubeRay's in-tree one too) turns into a new GPU node. Shrinking retires only
workers whose row says idle for `idle_timeout_s`, at most once per `cooldown_s`, through
`WorkerActor.retire`: the worker stops claiming, finishes any job it claimed meanwhile, and exits, so
its node goes idle and the autoscaler removes it. A busy worker is never asked, and never killed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from mochi_lab.config import ScalingConfig
from mochi_lab.logs import log_repeating
from mochi_lab.model import StoreError
from mochi_lab.pool.driver import ACTOR_PREFIX, Pool
from mochi_lab.store import Store

log = logging.getLogger("mochi_lab.pool.controller")


def desired_workers(work: int, config: ScalingConfig) -> int:
    """clamp(ceil(work / target_per_worker), min_workers, max_workers)."""
    return max(config.min_workers, min(config.max_workers, math.ceil(work / config.target_per_worker)))


def _index(name: str) -> int:
    return int(name[len(ACTOR_PREFIX):])


class PoolController:
    """Sizes `pool` from the store's queue every `config.interval_s` (`start()`), or once per `tick()`.

    `snapshot` is the last tick's view (leader, work, desired, workers, retiring, bounds), for metrics
    and panels."""

    def __init__(self, pool: Pool, store: Store, config: ScalingConfig, *, holder: str | None = None):
        self.pool = pool
        self.store = store
        self.config = config
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.role = f"pool:{pool.settings.namespace}"
        self.retiring: dict[str, Any] = {}  # name -> ref of its retire call
        self.snapshot: dict[str, Any] = {"leader": False}
        self._last_change = -math.inf  # monotonic time of the last start or retire (the cool-down's start)
        self._take = False
        self._headroom: int | None = None  # the last request_resources size sent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- configuration ---------------------------------------------------------------------------
    def set_bounds(self, min_workers: int, max_workers: int) -> None:
        """An admin's resize: min and max (`cluster.scale(n)` sets both to n). This replica takes the
        lead at its next tick, so the bounds it was given are the ones in force."""
        self.config = ScalingConfig(**{**self.config.model_dump(), "min_workers": min_workers,
                                       "max_workers": max_workers})
        self._take = True

    # -- the loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mochi-pool-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.interval_s * 3)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except StoreError as exc:  # an outage: keep the pool as it is, try again next tick
                log_repeating(log, logging.WARNING, "pool controller: store unavailable: %s", exc)
                self.snapshot = {**self.snapshot, "leader": False}
            except Exception:
                log_repeating(log, logging.ERROR, "pool controller tick failed", exc_info=True)
            self._stop.wait(self.config.interval_s)

    def tick(self) -> dict[str, Any]:
        """One decision. Returns (and keeps as `snapshot`) what it saw and did."""
        config = self.config
        leader = self.store.lead(self.role, self.holder, config.interval_s * 3, take=self._take)
        self._take = False
        if not leader:
            self.snapshot = {"leader": False}
            return self.snapshot
        work = sum(self.store.queue_depth().values())  # every worker claims every model's jobs
        desired = desired_workers(work, config)
        handles = self.pool.handles()
        self._forget_retired(handles)
        active = sorted((n for n in handles if n not in self.retiring), key=_index)
        rows = {r["worker_id"]: r for r in self.store.workers()}
        started: list[str] = []
        retired: list[str] = []
        if desired > len(active):
            started = self._grow(set(handles), desired - len(active))
            self._last_change = time.monotonic()  # new workers get the cool-down before any retires
        elif desired < len(active) and time.monotonic() - self._last_change >= config.cooldown_s:
            retired = self._shrink(active, rows, len(active) - desired)
        self._request_headroom(len(active) + len(started) - len(retired))
        self.snapshot = {"leader": True, "work": work, "desired": desired, "workers": len(active) + len(started),
                         "retiring": len(self.retiring), "pending": sum(1 for n in active if n not in rows),
                         "min_workers": config.min_workers, "max_workers": config.max_workers,
                         "started": started, "retired": retired}
        return self.snapshot

    # -- growing and shrinking ---------------------------------------------------------------------
    def _grow(self, taken: set[str], count: int) -> list[str]:
        """Start `count` actors under the lowest free names, through `Pool.ensure(n)` (which starts
        every missing name below n)."""
        free, i = [], 0
        while len(free) < count:
            if f"{ACTOR_PREFIX}{i}" not in taken:
                free.append(f"{ACTOR_PREFIX}{i}")
            i += 1
        self.pool.ensure(_index(free[-1]) + 1)
        log.info("pool controller: starting %s", free)
        return free

    def _shrink(self, active: list[str], rows: dict[str, dict[str, Any]], count: int) -> list[str]:
        """Retire up to `count` workers idle for idle_timeout_s, highest names first. A worker without
        a row (pending, or its row lapsed) or in any state but idle is left alone."""
        now = time.time()
        idle = [n for n in reversed(active)
                if rows.get(n, {}).get("state") == "idle" and rows[n].get("current_job") is None
                and rows[n].get("idle_since") is not None
                and now - rows[n]["idle_since"] >= self.config.idle_timeout_s]
        chosen = idle[:count]
        if chosen:
            self.retiring.update(self.pool.retire(chosen))
            self._last_change = time.monotonic()
            log.info("pool controller: retiring idle %s", chosen)
        return chosen

    def _forget_retired(self, handles: dict[str, Any]) -> None:
        gone = [name for name in self.retiring if name not in handles]
        for name in gone:  # gone: its node can go too
            del self.retiring[name]
        if gone:
            self.pool.forget(gone)  # a gang's peers and placement group hold its GPUs until then

    def _request_headroom(self, workers: int) -> None:
        """With headroom_workers, ask the Ray autoscaler for room for that many more workers than the pool
        has (a bundle per worker); without, ask nothing, so idle GPU nodes can go away."""
        extra = self.config.headroom_workers
        if not extra and self._headroom is None:
            return
        size = workers + extra if extra else 0
        if size == self._headroom:
            return
        from ray.autoscaler.sdk import request_resources

        # a gang's GPUs in one bundle: its placement group packs them on one node
        gpus = self.pool.settings.gpus_per_worker
        request_resources(bundles=[{"GPU": gpus}] * size)
        self._headroom = size


__all__ = ["PoolController", "desired_workers"]
