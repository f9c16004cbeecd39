"""`ClusterPanel`: the workers with what each is running (and its CPU use, or its GPU's where NVML
reports it), the cluster's queue with when each job should start, the jobs finished per minute over the
last minutes, and this account's job counts, refreshed while a view of it is on screen. A notebook saved
with the save hook keeps its last state, with the time it was read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from mochi_lab.model import DONE, RUNNING
from mochi_lab.queue_eta import RECENT_RUNS, RUN_TIMES_EVERY_S, RunTimes, busy_for, queue_starts, run_times

from ._format import error_html, job_view, mapping, render, to_float, to_int
from ._poll import Poller
from .save_hook import StaticStandIn
from .throughput import Throughput, throughput_html

if TYPE_CHECKING:
    from mochi_lab.client.cluster import MochiCluster
    from mochi_lab.client.follow import Follower
    from mochi_lab.client.job import Job

COLUMNS = ("worker", "node", "device", "memory", "CPU use", "GPU use", "model", "state", "current job",
           "jobs done", "uptime")
# What a column counts, where its name alone could mislead (shown as the header's tooltip and in its text).
COLUMN_TITLES = {
    "current job": "this account's job by its prompt, with its stage, step and share of the whole job done, as every "
                   "view of the job in this notebook shows it",
    "jobs done": "jobs this worker has finished since it started (every account's)",
    "CPU use": "the worker process's CPU use over its last heartbeat, in % of one core",
    "GPU use": "the GPU's utilisation and power draw, as NVML reports them",
}
QUEUE_COLUMNS = ("#", "prompt", "size", "priority", "waiting", "starts in", "job")
QUEUE_SHOWN = 20  # queue rows drawn; the rest are counted
_LISTED = 1000  # running jobs and queue rows read per refresh


def job_brief(job: "Job | None") -> dict[str, Any] | None:
    """What a worker's current job shows: prompt, stage, step and the whole job's progress (None: not this
    account's)."""
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
        "jobs_done": r.get("jobs_done", 0), "uptime": r.get("uptime_s"), "cpu": to_float(r.get("cpu_percent")),
    }


def workers_html(rows: list[dict[str, Any]], jobs: Mapping[str, dict[str, Any]] | None = None) -> str:
    """The worker rows as a compact HTML table; `jobs` maps a job id to its view (this account's)."""
    jobs = jobs or {}
    views = [worker_view(r, jobs.get(mapping(r).get("current_job"))
                         if isinstance(mapping(r).get("current_job"), str) else None) for r in rows]
    # GPU use only where NVML reports it, CPU use where workers report it: no column of dashes
    gpu_use = any(v["gpu_util"] is not None for v in views)
    cpu_use = any(v["cpu"] is not None for v in views)
    columns = tuple(c for c in COLUMNS if (c != "GPU use" or gpu_use) and (c != "CPU use" or cpu_use))
    return render("cluster_panel.html", "workers", rows=views, columns=columns, gpu_use=gpu_use, cpu_use=cpu_use,
                  titles=COLUMN_TITLES)


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


def queue_view(rows: list[Any], now: float | None = None, starts: list[float | None] | None = None
               ) -> list[dict[str, Any]]:
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
            "starts_in": starts[len(views)] if starts is not None and len(views) < len(starts) else None,
        })
    return views


def queue_html(rows: list[Any], now: float | None = None, starts: list[float | None] | None = None) -> str:
    views = queue_view(rows, now, starts)
    # the account column only where the server named other accounts (it does so for admins)
    accounts = any(v["account"] is not None and not v["mine"] for v in views)
    columns = QUEUE_COLUMNS[:1] + ("account",) + QUEUE_COLUMNS[1:] if accounts else QUEUE_COLUMNS
    return render("cluster_panel.html", "queue", rows=views[:QUEUE_SHOWN], more=max(0, len(views) - QUEUE_SHOWN),
                  columns=columns, accounts=accounts)


def counts_html(counts: Any) -> str:
    """This account's job counts by status ("this account's jobs: queued <b>2</b> · running <b>1</b> ...")."""
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


class ClusterPanel(StaticStandIn, W.VBox):
    """Workers (with the prompt and progress of each one's current job), the queue and this account's counts.

    The kernel cannot see the screen, but the front end counts the views it shows of a widget
    (`_view_count`, once the kernel sets it to 0). The panel refreshes every `interval` seconds while
    that count is above zero and stops when the last view goes (output cleared, notebook closed).
    """

    def __init__(self, cluster: "MochiCluster", *, interval: float = 2.0):
        self.cluster = cluster
        self._snapshots: list[Any] = []  # display handles of the static stand-ins
        self.read_at: float | None = None  # when the state on screen was read
        self.throughput = Throughput()
        self.rate = W.HTML()  # the throughput sparkline
        self._run_times: tuple[float, RunTimes] | None = None  # (when read, this account's recent run times)
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
        self.starts: list[float | None] = []  # when each of those should start, in seconds from the read
        self.running: list[Any] = []  # this account's running jobs, as last read
        self._followers: dict[str, "Follower"] = {}  # of those, the ones another view follows in this process
        self._refreshing = False
        self.refreshes = 0  # how many times the table was redrawn (tests and curious users)
        self.poller = Poller(self._tick, interval)
        super().__init__([
            W.HBox([self.refresh_button, self.updated, self.scale_to, self.scale_button, self.dashboard],
                   layout=W.Layout(align_items="center")),
            W.HBox([self.summary, self.rate], layout=W.Layout(align_items="center", grid_gap="16px")),
            self.counts, self.table, self.queue, self.message,
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
        self.read_at = now = time.time()
        self.running = list(running)
        self._follow(self.running)
        self.throughput.add(self.rows, now)
        before = (self.summary.value, self.table.value, self.queue.value, self.counts.value)
        self.summary.value = summary_html(self.rows)
        self.table.value = workers_html(self.rows, self._jobs())
        self.starts = self._starts()
        self.queue.value = queue_html(self.queued, now, self.starts)
        self.counts.value = counts_html(counts)
        self.rate.value = throughput_html(self.throughput, now)
        self.updated.value = f"updated {time.strftime('%H:%M:%S', time.localtime(now))}"
        # the stand-in follows what changed; a panel whose only change is its clock is sent now and then
        self._snapshot_changed(clock_only=before == (self.summary.value, self.table.value, self.queue.value,
                                                     self.counts.value))

    def _follow(self, running: list[Any]) -> None:
        """Show each running job as its other views in this process show it (a displayed job, a Studio card):
        the panel's read, the newest, goes to the job's one follower (`job.follower`), which tells them all
        now, and the panel redraws its table whenever that follower reads the job again (a panel that drew its
        own reads showed 42/200 beside a job at 47/200)."""
        found: dict[str, "Follower"] = {}
        self._refreshing = True
        try:
            for job in running:
                follower = job.follower
                found[job.id] = follower
                r, seen = job.record, follower.record
                newer = (to_int(r.attempts, 0), to_int(r.step, 0)) >= (to_int(seen.attempts, 0), to_int(seen.step, 0))
                if r is not seen and newer and not follower.finished:
                    follower.observe(r)
        finally:
            self._refreshing = False
        for job_id, follower in self._followers.items():
            if found.get(job_id) is not follower:
                follower.unlisten(self._job_told)
        for follower in found.values():
            follower.listen(self._job_told)
        self._followers = found

    def _jobs(self) -> dict[str, dict[str, Any] | None]:
        """This account's running jobs' views, each as its follower last saw it."""
        return {j.id: job_view(self._followers[j.id].record) if j.id in self._followers else job_brief(j)
                for j in self.running}

    def _job_told(self, follower: "Follower") -> None:
        """A followed job's new state: redraw the table from what the panel last read and the followers saw."""
        if self.comm is None:
            self._unfollow()
            return
        if self._refreshing:  # the refresh draws it
            return
        self.table.value = workers_html(self.rows, self._jobs())
        self._snapshot_changed(clock_only=True)  # the stand-in follows at the next refresh that changes it

    def _unfollow(self) -> None:
        for follower in self._followers.values():
            follower.unlisten(self._job_told)
        self._followers = {}

    def _starts(self) -> list[float | None]:
        """When each queued job should start (`mochi_lab.queue_eta`, as `Job.queue_position` says it), from what
        this refresh read and this account's recent run times (read again every RUN_TIMES_EVERY_S)."""
        if not self.queued:
            return []
        now = time.monotonic()
        if self._run_times is None or now - self._run_times[0] >= RUN_TIMES_EVERY_S:
            try:
                done = [job.record for job in self.cluster.jobs(status=DONE, limit=RECENT_RUNS)]
            except Exception:  # an estimate is a nicety: the queue shows without it
                done = []
            self._run_times = (now, run_times(done))
        busy = busy_for(self.rows, [job.record for job in self.running])
        return queue_starts(self.queued, self.rows, busy, self._run_times[1])

    # -- the notebook file -----------------------------------------------------------
    _live_text = "ClusterPanel (live: needs its kernel)"

    def static_html(self) -> str:
        """The panel's last state as static HTML, with the time it was read (what a notebook saved with
        the save hook shows when it is opened without its kernel)."""
        from markupsafe import Markup

        # Markup only for this panel's own HTML as shown, each part rendered (and escaped) by its template
        # above; nothing read from the store is marked safe.
        parts = [Markup(p) for p in (self.summary.value, self.rate.value, self.counts.value, self.table.value,
                                     self.queue.value)]
        return render("cluster_panel.html", "snapshot", read_at=self.read_at, parts=parts)

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
        self._unfollow()
        super().close()
