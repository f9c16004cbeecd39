"""The cluster panel's throughput: jobs finished per minute over the last minutes, counted from the workers'
`jobs_done` as each refresh reads them, and drawn as a small bar sparkline."""

from __future__ import annotations

import time
from typing import Any

from ._format import mapping, render

THROUGHPUT_WINDOW_S = 600  # the sparkline's span: the last 10 minutes, one bar a minute


class Throughput:
    """Jobs finished per minute over the last minutes, from the workers' `jobs_done` counts as read at
    each refresh (a worker that restarts starts again from zero: only increases count)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self.last: dict[str, int] = {}
        self.events: list[tuple[float, int]] = []  # (when read, jobs finished since the read before)
        self.since: float | None = None  # the first read: the sparkline says how far back it goes

    def add(self, rows: list[Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.since = now if self.since is None else self.since
        finished = 0
        for row in rows:
            r = mapping(row)
            done = r.get("jobs_done")
            if not isinstance(done, int) or isinstance(done, bool):
                continue
            wid = str(r.get("worker_id"))
            if wid in self.last and done > self.last[wid]:
                finished += done - self.last[wid]
            self.last[wid] = done
        if finished:
            self.events.append((now, finished))
        self.events = [(t, n) for t, n in self.events if now - t <= self.window_s]

    def per_minute(self, now: float | None = None) -> list[int]:
        """Jobs finished in each of the window's minutes, oldest first."""
        now = time.time() if now is None else now
        bins = [0] * max(1, int(self.window_s // 60))
        for t, n in self.events:
            i = len(bins) - 1 - int((now - t) // 60)
            if 0 <= i < len(bins):
                bins[i] += n
        return bins


def throughput_html(throughput: Throughput, now: float | None = None) -> str:
    """A small bar sparkline of jobs finished per minute, with the total and the span it covers."""
    now = time.time() if now is None else now
    bins = throughput.per_minute(now)
    top = max(bins) or 1
    bars = [{"x": i * 6, "h": round(14 * n / top, 1), "n": n, "ago": len(bins) - i} for i, n in enumerate(bins)]
    span = min(throughput.window_s, now - throughput.since) if throughput.since is not None else 0.0
    return render("cluster_panel.html", "throughput", bars=bars, total=sum(bins), width=len(bins) * 6,
                  minutes=round(throughput.window_s / 60), span=span)
