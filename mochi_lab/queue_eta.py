"""When a queued job should start: the one estimate that every view of the queue shows (`Job.queue_position`,
the cluster panel's "starts in" column), so two views of one queued job give one answer from the same reads.

Pure functions over what the callers read (queue rows, worker rows, job records): no I/O, no backend. The
callers decide when to read; this module decides what the reads mean. The estimate is a small simulation:
each worker that serves a job's model takes the next queued job as it frees up, an idle one now, a busy one
when its job's own ETA says, and each job ahead runs for the median recent run time of its shape. Where
nothing says how long a worker stays busy there is no guess: that worker is left out, and a job with no
worker left to go by has no estimate (None).

The store is a trust boundary and the rows may come over the network: any value may be of any type; one
that is not a plain number or name is no input, never an error.

It sits with the shared modules, below the rooms: the job handle (the client) and the cluster panel (a widget,
which imports no client module at run time) both use it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RECENT_RUNS = 50  # this account's finished jobs (the newest) whose run times the estimate goes by
RUN_TIMES_EVERY_S = 15.0  # how often those are read again: run times change slowly, the queue does not
# What a job's run time depends on, as its params name it, and as a queue row names it (in the same order).
SHAPE = ("model", "width", "height", "num_frames", "num_inference_steps")
ROW_SHAPE = ("model", "width", "height", "num_frames", "steps")


def seconds(value: Any) -> float | None:
    """`value` as seconds when it is a finite number >= 0 (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def shape_key(values: Iterable[Any]) -> tuple | None:
    """A job's shape (model, size, frames, steps) as a dict key; None when a value is not plain (a hostile
    record may hold a list where a number belongs)."""
    key = tuple(values)
    plain = all(v is None or isinstance(v, (str, int, float)) for v in key)
    return key if plain else None


def params_shape(params: Any) -> tuple | None:
    """The shape of a job's params (a record's `params`)."""
    p = _mapping(params)
    return shape_key(p.get(k) for k in SHAPE)


def row_shape(row: Any) -> tuple | None:
    """The shape of a queue row (`Backend.queue()`), which names the steps `steps`."""
    r = _mapping(row)
    return shape_key(r.get(k) for k in ROW_SHAPE)


def serves(worker_model: Any, job_model: Any) -> bool:
    """Whether a worker of `worker_model` may take a job of `job_model` (either unnamed: any)."""
    return not worker_model or not job_model or worker_model == job_model


def serving(workers: Iterable[Any], model: Any) -> int:
    """How many of the worker rows serve `model`, whatever their state."""
    return sum(1 for row in workers if isinstance(row, Mapping) and serves(row.get("model"), model))


@dataclass(frozen=True)
class RunTimes:
    """Recent run times: the median of each shape (`by_shape`) and of all (`every`), from `runs` finished runs."""

    every: float | None = None
    by_shape: Mapping[tuple, float] = field(default_factory=dict)
    runs: int = 0

    def of(self, shape: tuple | None) -> float | None:
        """How long a job of `shape` should run: its shape's median, else all runs' (None: no run to go by)."""
        return self.by_shape.get(shape, self.every) if shape is not None else self.every


def run_times(records: Iterable[Any]) -> RunTimes:
    """The median run time (`timings["run_s"]`) of each shape and of all, from finished jobs' records."""
    every: list[float] = []
    by_shape: dict[tuple, list[float]] = {}
    for r in records:
        took = seconds(_mapping(getattr(r, "timings", None)).get("run_s"))
        if took is None:
            continue
        every.append(took)
        key = params_shape(getattr(r, "params", None))
        if key is not None:
            by_shape.setdefault(key, []).append(took)
    return RunTimes(statistics.median(every) if every else None,
                    {k: statistics.median(v) for k, v in by_shape.items()}, len(every))


def busy_for(workers: Iterable[Any], running: Iterable[Any]) -> dict[str, float]:
    """How long each busy worker stays busy, in seconds from the read, by worker id: its current job's own ETA
    (`live["eta_s"]`, the worker's figure), where that job is among the `running` records read (an account
    sees its own jobs' records; another account's job, or one with no ETA yet, is not here)."""
    left: dict[str, float] = {}
    for r in running:
        job_id, eta = getattr(r, "id", None), seconds(_mapping(getattr(r, "live", None)).get("eta_s"))
        if isinstance(job_id, str) and eta is not None:
            left[job_id] = eta
    out: dict[str, float] = {}
    for row in workers:
        w = _mapping(row)
        job = w.get("current_job")
        if isinstance(job, str) and job in left:
            out[str(w.get("worker_id"))] = left[job]
    return out


def queue_starts(queue: Iterable[Any], workers: Iterable[Any], busy: Mapping[str, float],
                 times: RunTimes) -> list[float | None]:
    """When each queued job (in queue order, `Backend.queue()`'s rows) should start, in seconds from now.

    Each worker row that serves the job's model takes the next job as it frees up: an idle one (or a loading
    one, or a row with no state) now, a busy one after `busy[worker_id]` seconds (`busy_for`), and each job
    it takes keeps it for `times.of(the job's shape)`. A busy worker with no time left to go by (another
    account's job, one that has not reported an ETA yet), or one that took a job of unknown length, is left
    out from then on: the estimate is then when the job starts at the latest, or None where no worker is left
    (no worker for the model, or none whose time is known). Workers in any other state (error, stopping)
    take no jobs. A row's estimate depends only on the rows before it: a prefix of the queue gives the same
    starts. An estimate: jobs queued later by an account that has waited longer may still go first.
    """
    free: list[float | None] = []  # per worker row: when it frees up; None: nobody knows
    models: list[Any] = []
    ids: list[str] = []
    for w in workers:
        if not isinstance(w, Mapping):  # no worker row (the rows may come over the network)
            continue
        state = w.get("state")
        wid = str(w.get("worker_id"))
        if state == "busy":
            at = seconds(busy.get(wid))
        elif state in ("idle", "loading", None):
            at = 0.0
        else:
            continue
        free.append(at)
        models.append(w.get("model"))
        ids.append(wid)
    out: list[float | None] = []
    for row in queue:
        q = _mapping(row)
        able = [i for i, at in enumerate(free) if at is not None and serves(models[i], q.get("model"))]
        if not able:
            out.append(None)
            continue
        # the earliest free; a tie goes to the lower worker id, so any order of the rows gives one answer
        i = min(able, key=lambda k: (free[k], ids[k]))
        start = free[i]
        out.append(start)
        took = times.of(row_shape(q))
        free[i] = None if took is None or start is None else start + took
    return out


__all__ = ["RECENT_RUNS", "ROW_SHAPE", "RUN_TIMES_EVERY_S", "SHAPE", "RunTimes", "busy_for", "params_shape",
           "queue_starts", "row_shape", "run_times", "seconds", "serves", "serving", "shape_key"]
