"""`ClusterPanel`: the worker table and job counts, refreshed while a view of it is on screen."""

from __future__ import annotations

import asyncio
import html
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from ._format import error_html, gib, seconds
from ._poll import Poller

if TYPE_CHECKING:
    from mochi_lab.client import MochiCluster

STATE_COLOURS = {"idle": "#198754", "busy": "#0d6efd", "loading": "#b8860b", "error": "#dc3545"}
COLUMNS = ("worker", "node", "device", "memory", "model", "state", "current job", "jobs done", "uptime")


def workers_html(rows: list[dict[str, Any]]) -> str:
    """The worker rows as a compact HTML table."""
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        device = r.get("gpu_name") or r.get("device") or "-"
        used, total = r.get("gpu_memory_used"), r.get("gpu_memory_total")
        memory = f"{gib(used)} / {gib(total)}" if total else f"RSS {gib(r.get('rss_bytes'))}"
        state = str(r.get("state"))
        colour = STATE_COLOURS.get(state, "#6c757d")
        cells = [
            html.escape(str(r.get("worker_id"))), html.escape(str(r.get("node") or "-")), html.escape(str(device)),
            memory, html.escape(str(r.get("model") or "-")),
            f"<span style='color:{colour};font-weight:bold'>{html.escape(state)}</span>"
            + (f" <span title='{html.escape(str(r['error']))}'>⚠</span>" if r.get("error") else ""),
            f"<code>{html.escape(str(r.get('current_job') or '-'))}</code>", str(r.get("jobs_done", 0)),
            seconds(r.get("uptime_s")),
        ]
        body.append("<tr>" + "".join(f"<td style='padding:2px 8px'>{c}</td>" for c in cells) + "</tr>")
    if not body:
        body.append(f"<tr><td colspan={len(COLUMNS)}><i>no live workers</i></td></tr>")
    return (f"<table class='mochi-workers' style='border-collapse:collapse;font-size:12px'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


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
        self.counts.value = "jobs: " + " · ".join(f"{k} <b>{v}</b>" for k, v in counts.items())
        self.updated.value = f"updated {time.strftime('%H:%M:%S')}"

    def scale(self, n: int) -> None:
        """Resize the pool. Shrinking drains workers (seconds), so on a kernel it runs off the event loop."""
        self.scale_button.disabled = True
        self.message.value = f"scaling to {n} workers…"
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
        self.message.value = error_html(error) if error else f"pool scaled to {n}; new workers load their model first"
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
