"""`ClusterPanel`: the workers with what each is running, the cluster's queue and this account's job
counts, refreshed while a view of it is on screen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from mochi_lab.model import RUNNING

from ._format import error_html, job_view, mapping, render, to_float
from ._poll import Poller

if TYPE_CHECKING:
    from mochi_lab.client.cluster import MochiCluster
    from mochi_lab.client.job import Job

COLUMNS = ("worker", "node", "device", "memory", "GPU use", "model", "state", "current job", "jobs done", "uptime")
QUEUE_COLUMNS = ("#", "prompt", "size", "priority", "waiting", "job")
QUEUE_SHOWN = 20  # queue rows drawn; the rest are counted
_LISTED = 1000  # running jobs and queue rows read per refresh


def job_brief(job: "Job | None") -> dict[str, Any] | None:
    """What a worker's current job shows: prompt, stage and step progress (None: not this account's)."""
    return None if job is None else job_view(job.record)


def worker_view(row: Any, job: dict[str, Any] | None = None) -> dict[str, Any]:
    """One worker row's display facts, as plain values the template escapes (no type assumed).

    `job` is its current job's view when that job is this account's; another account's job is shown
    by id only, or, where the server hides its id (a gateway, to all but admins), as a busy worker's."""
    r = mapping(row)
    return {
        "worker_id": r.get("worker_id"), "node": r.get("node") or "-",
        "device": r.get("gpu_name") or r.get("device") or "-",
        # the device's memory as NVML reads it where there is one, else what this process allocated
        "gpu_used": r.get("gpu_device_memory_used", r.get("gpu_memory_used")),
        "gpu_total": r.get("gpu_device_memory_total", r.get("gpu_memory_total")), "rss": r.get("rss_bytes"),
        "gpu_util": to_float(r.get("gpu_utilization")), "gpu_power": to_float(r.get("gpu_power_w")),
        "model": r.get("model") or "-", "state": r.get("state"), "error": r.get("error"),
        "current_job": r.get("current_job") or "-", "job": job,
        "jobs_done": r.get("jobs_done", 0), "uptime": r.get("uptime_s"),
    }


def workers_html(rows: list[dict[str, Any]], jobs: Mapping[str, dict[str, Any]] | None = None) -> str:
    """The worker rows as a compact HTML table; `jobs` maps a job id to its view (this account's)."""
    jobs = jobs or {}
    views = [worker_view(r, jobs.get(mapping(r).get("current_job"))
                         if isinstance(mapping(r).get("current_job"), str) else None) for r in rows]
    # GPU use only where NVML reports it: a CPU pool gets no column of dashes
    gpu_use = any(v["gpu_util"] is not None for v in views)
    columns = COLUMNS if gpu_use else tuple(c for c in COLUMNS if c != "GPU use")
    return render("cluster_panel.html", "workers", rows=views, columns=columns, gpu_use=gpu_use)


def pool_summary(rows: list[Any]) -> dict[str, Any]:
    """How many workers, of which kind (CPU, or GPU with their names), and how many per state."""
    rows = [mapping(r) for r in rows]
    gpus = sorted({str(r.get("gpu_name")) for r in rows if r.get("gpu_name")})
    on_gpu = sum(1 for r in rows if r.get("gpu_name") or r.get("device") == "cuda")
    states: dict[str, int] = {}
    for r in rows:
        state = r.get("state") if isinstance(r.get("state"), str) else "unknown"
        states[state] = states.get(state, 0) + 1
    kind = "GPU" if on_gpu and on_gpu == len(rows) else "CPU" if not on_gpu else "mixed"
    return {"n": len(rows), "kind": kind, "gpus": gpus, "states": sorted(states.items())}


def summary_html(rows: list[Any]) -> str:
    """"2 CPU workers · 1 busy · 1 idle", or "4 GPU workers (NVIDIA H100) · ..."."""
    return render("cluster_panel.html", "summary", s=pool_summary(rows))


def queue_view(rows: list[Any], now: float | None = None) -> list[dict[str, Any]]:
    """The cluster's queue rows (`MochiCluster.queue()`) as display facts, in the order given (the order
    workers take them). Another account's job shows no prompt; its account shows where the server named it
    (for admins). No type is assumed: the rows come from the store or over the network."""
    now = time.time() if now is None else now
    views = []
    for row in rows:
        r = mapping(row)
        created = to_float(r.get("created_at"))
        views.append({
            "position": r.get("position"), "mine": r.get("mine") is True, "account": r.get("account"),
            "id": r.get("id"), "prompt": r.get("prompt"), "width": r.get("width"), "height": r.get("height"),
            "num_frames": r.get("num_frames"), "steps": r.get("steps"), "priority": r.get("priority"),
            "waiting": None if created is None else max(0.0, now - created),
        })
    return views


def queue_html(rows: list[Any], now: float | None = None) -> str:
    views = queue_view(rows, now)
    # the account column only where the server named other accounts (it does so for admins)
    accounts = any(v["account"] is not None and not v["mine"] for v in views)
    columns = QUEUE_COLUMNS[:1] + ("account",) + QUEUE_COLUMNS[1:] if accounts else QUEUE_COLUMNS
    return render("cluster_panel.html", "queue", rows=views[:QUEUE_SHOWN], more=max(0, len(views) - QUEUE_SHOWN),
                  columns=columns, accounts=accounts)


def counts_html(counts: Any) -> str:
    """This account's job counts by status ("queued <b>2</b> · running <b>1</b> ...")."""
    items = list(counts.items()) if isinstance(counts, Mapping) else []
    return render("cluster_panel.html", "counts", counts=items)


def dashboard_html(url: str | None) -> str:
    """A link to the Ray dashboard, or nothing when none answers from here."""
    return render("cluster_panel.html", "dashboard", url=url) if url else ""


def notice_html(message: str) -> str:
    return render("cluster_panel.html", "notice", message=message)


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def scaled_message(before: int, after: int) -> str:
    """What a resize did: growing loads the model on the new workers; shrinking drains the removed ones."""
    if after > before:
        return f"pool scaled from {before} to {_workers(after)}; the new ones load their model before taking jobs"
    if after < before:
        return f"pool scaled from {before} to {_workers(after)}; the removed ones finished their running jobs first"
    return f"pool kept at {_workers(after)}"


class ClusterPanel(W.VBox):
    """Workers (with the prompt and progress of each one's current job), the queue and this account's counts.

    The kernel cannot see the screen, but the front end counts the views it shows of a widget
    (`_view_count`, once the kernel sets it to 0). The panel refreshes every `interval` seconds while
    that count is above zero and stops when the last view goes (output cleared, notebook closed).
    """

    def __init__(self, cluster: "MochiCluster", *, interval: float = 2.0):
        self.cluster = cluster
        self.summary = W.HTML()
        self.table = W.HTML()
        self.queue = W.HTML()
        self.counts = W.HTML()
        self.updated = W.Label()
        self.refresh_button = W.Button(description="Refresh", icon="refresh",
                                       layout=W.Layout(width="auto", min_width="90px"))
        self.refresh_button.on_click(lambda _: self.refresh())
        self.scale_to = W.BoundedIntText(min=0, max=256, description="workers", layout=W.Layout(width="160px"),
                                         style={"description_width": "55px"})
        self.scale_button = W.Button(description="Scale", icon="arrows-v",
                                     layout=W.Layout(width="auto", min_width="80px"))
        self.scale_button.on_click(lambda _: self.scale(self.scale_to.value))
        self.message = W.HTML()
        try:
            self.dashboard = W.HTML(dashboard_html(cluster.dashboard_url()))
        except Exception:  # a link is a convenience: never a reason for the panel to fail
            self.dashboard = W.HTML()
        self.rows: list[dict[str, Any]] = []
        self.queued: list[dict[str, Any]] = []  # the cluster's queue (`MochiCluster.queue()`), as last read
        self.refreshes = 0  # how many times the table was redrawn (tests and curious users)
        self.poller = Poller(self._tick, interval)
        super().__init__([
            W.HBox([self.refresh_button, self.updated, self.scale_to, self.scale_button, self.dashboard],
                   layout=W.Layout(align_items="center")),
            self.summary, self.counts, self.table, self.queue, self.message,
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
        """Read the workers, this account's running jobs, the queue and the counts (four reads), and redraw."""
        try:
            self.rows = list(self.cluster.workers())
            running = self.cluster.jobs(status=RUNNING, limit=_LISTED)
            self.queued = list(self.cluster.queue(limit=_LISTED))
            counts = self.cluster.counts()
        except Exception as exc:
            self.message.value = error_html(f"{type(exc).__name__}: {exc}")
            return
        self.refreshes += 1
        mine = {j.id: job_brief(j) for j in running}
        self.summary.value = summary_html(self.rows)
        self.table.value = workers_html(self.rows, mine)
        self.queue.value = queue_html(self.queued)
        self.counts.value = counts_html(counts)
        self.updated.value = f"updated {time.strftime('%H:%M:%S')}"

    def scale(self, n: int) -> None:
        """Resize the pool. Shrinking drains workers (seconds), so on a kernel it runs off the event loop."""
        before = len(self.rows)
        self.scale_button.disabled = True
        self.message.value = notice_html(f"scaling from {before} to {_workers(n)}…")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # a script or test: just do it
            self._scaled(before, n, self._do_scale(n))
            return
        # Only the Ray calls leave the loop; the widget is updated back on the loop when they end.
        future = loop.run_in_executor(None, self._do_scale, n)
        future.add_done_callback(lambda f: self._scaled(before, n, f.result()))

    def _do_scale(self, n: int) -> str | None:
        try:
            self.cluster.scale(n)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def _scaled(self, before: int, n: int, error: str | None) -> None:
        self.scale_button.disabled = False
        self.message.value = error_html(error) if error else notice_html(scaled_message(before, n))
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
