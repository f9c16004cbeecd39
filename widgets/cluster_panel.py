"""`ClusterPanel`: the worker table and job counts, refreshed while a view of it is on screen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from ._format import error_html, mapping, render
from ._poll import Poller

if TYPE_CHECKING:
    from mochi_lab import MochiCluster

COLUMNS = ("worker", "node", "device", "memory", "model", "state", "current job", "jobs done", "uptime")


def worker_view(row: Any) -> dict[str, Any]:
    """One worker row's display facts, as plain values the template escapes (no type assumed)."""
    r = mapping(row)
    return {
        "worker_id": r.get("worker_id"), "node": r.get("node") or "-",
        "device": r.get("gpu_name") or r.get("device") or "-",
        "gpu_used": r.get("gpu_memory_used"), "gpu_total": r.get("gpu_memory_total"), "rss": r.get("rss_bytes"),
        "model": r.get("model") or "-", "state": r.get("state"), "error": r.get("error"),
        "current_job": r.get("current_job") or "-", "jobs_done": r.get("jobs_done", 0), "uptime": r.get("uptime_s"),
    }


def workers_html(rows: list[dict[str, Any]]) -> str:
    """The worker rows as a compact HTML table."""
    return render("cluster_panel.html", "workers", rows=[worker_view(r) for r in rows], columns=COLUMNS)


def counts_html(counts: Any) -> str:
    """This account's job counts by status ("queued <b>2</b> · running <b>1</b> ...")."""
    items = list(counts.items()) if isinstance(counts, Mapping) else []
    return render("cluster_panel.html", "counts", counts=items)


def notice_html(message: str) -> str:
    return render("cluster_panel.html", "notice", message=message)


class ClusterPanel(W.VBox):
    """Workers and this account's job counts.

    The kernel cannot see the screen, but the front end counts the views it shows of a widget
    (`_view_count`, once the kernel sets it to 0). The panel refreshes every `interval` seconds while
    that count is above zero and stops when the last view goes (output cleared, notebook closed).
    """

    def __init__(self, cluster: "MochiCluster", *, interval: float = 2.0):
        self.cluster = cluster
        self.table = W.HTML()
        self.counts = W.HTML()
        self.updated = W.Label()
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="90px"))
        self.refresh_button.on_click(lambda _: self.refresh())
        self.scale_to = W.BoundedIntText(min=0, max=256, description="workers", layout=W.Layout(width="160px"),
                                         style={"description_width": "55px"})
        self.scale_button = W.Button(description="Scale", icon="arrows-v", layout=W.Layout(width="80px"))
        self.scale_button.on_click(lambda _: self.scale(self.scale_to.value))
        self.message = W.HTML()
        self.rows: list[dict[str, Any]] = []
        self.refreshes = 0  # how many times the table was redrawn (tests and curious users)
        self.poller = Poller(self._tick, interval)
        super().__init__([
            W.HBox([self.refresh_button, self.updated, self.scale_to, self.scale_button]),
            self.counts, self.table, self.message,
        ])
        self.add_class("mochi-cluster-panel")
        self.observe(self._views_changed, "_view_count")
        self._view_count = 0  # start view counting in the front end
        self.refresh()
        self.scale_to.value = len(self.rows)

    @property
    def visible(self) -> bool:
        return bool(self._view_count)

    def refresh(self) -> None:
        """Read the worker rows and counts (two store reads) and redraw."""
        try:
            self.rows = list(self.cluster.workers())
            counts = self.cluster.counts()
        except Exception as exc:
            self.message.value = error_html(f"{type(exc).__name__}: {exc}")
            return
        self.refreshes += 1
        self.table.value = workers_html(self.rows)
        self.counts.value = counts_html(counts)
        self.updated.value = f"updated {time.strftime('%H:%M:%S')}"

    def scale(self, n: int) -> None:
        """Resize the pool. Shrinking drains workers (seconds), so on a kernel it runs off the event loop."""
        self.scale_button.disabled = True
        self.message.value = notice_html(f"scaling to {n} workers…")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # a script or test: just do it
            self._scaled(n, self._do_scale(n))
            return
        # Only the Ray calls leave the loop; the widget is updated back on the loop when they end.
        future = loop.run_in_executor(None, self._do_scale, n)
        future.add_done_callback(lambda f: self._scaled(n, f.result()))

    def _do_scale(self, n: int) -> str | None:
        try:
            self.cluster.scale(n)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def _scaled(self, n: int, error: str | None) -> None:
        self.scale_button.disabled = False
        self.message.value = (error_html(error) if error
                              else notice_html(f"pool scaled to {n}; new workers load their model first"))
        self.refresh()

    def _views_changed(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.poller.start()
        else:
            self.poller.stop()

    def _tick(self) -> bool:
        if self.comm is None or not self.visible:
            return False
        self.refresh()
        return True

    def close(self) -> None:
        self.poller.stop()
        super().close()
