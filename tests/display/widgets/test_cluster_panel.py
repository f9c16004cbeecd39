"""The cluster panel shows the live workers and refreshes only while the front end shows a view."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from mochi_lab.client.backend import queue_rows
from mochi_lab.display.widgets import ClusterPanel
from mochi_lab.display.widgets.cluster_panel import queue_view, scaled_message
from tests.support.fakes import PAYLOADS, FakeCluster, FakeJob, assert_safe, hostile_record, record
from tests.support.widget_helpers import pool_size, unique, until


def test_table_lists_every_live_worker(mochi):
    panel = ClusterPanel(mochi)
    workers = mochi.workers()
    n = pool_size(mochi)
    assert len(workers) == n
    body = panel.table.value.split("<tbody>")[1]
    assert len(re.findall("<tr>", body)) == len(workers)
    for w in workers:
        assert w["worker_id"] in body
    assert re.search(r"(idle|busy)", body) and "tiny" in body
    assert all(f"{s} <b>" in panel.counts.value for s in ("queued", "running", "done", "failed", "cancelled"))
    assert panel.scale_to.value == n
    assert f"{n} CPU workers" in panel.summary.value and "GPU" not in panel.summary.value  # the session is CPU-only
    assert "<b>queue</b>" in panel.queue.value


def test_refreshes_while_a_view_is_shown_and_stops_when_it_goes(mochi):
    panel = ClusterPanel(mochi, interval=0.1)

    async def main() -> None:
        await asyncio.sleep(0.35)
        assert not panel.poller.running  # no front end has shown it: no store reads
        start = panel.refreshes
        panel._view_count = 1  # what JupyterLab sends when it renders a view
        await until(lambda: panel.refreshes >= start + 3)
        assert panel.poller.running
        panel._view_count = 0  # the output was cleared or the notebook closed
        stopped = panel.refreshes
        await asyncio.sleep(0.35)
        assert not panel.poller.running and panel.refreshes == stopped

    asyncio.run(main())


class Counting:
    """A handle whose method calls are counted: `calls["workers"]` is the number of worker-table reads."""

    def __init__(self, target):
        self._target = target
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


async def _close_while_polling(panel: ClusterPanel, reads) -> None:
    """Show a view, let it poll, close it: the poll task must end at once and read nothing more."""
    panel._view_count = 1
    await until(lambda: reads() >= 2)
    task = panel.poller._task
    assert task is not None and not task.done()
    panel.close()
    await asyncio.sleep(0.01)  # far less than one interval: only a cancelled task can be done by now
    assert task.cancelled() and not panel.poller.running
    after = reads()
    await asyncio.sleep(0.6)
    assert reads() == after  # no store read after close


def test_closing_stops_refreshing(mochi):
    cluster = Counting(mochi)
    panel = ClusterPanel(cluster, interval=0.2)
    asyncio.run(_close_while_polling(panel, lambda: cluster.calls["workers"]))


def test_closing_stops_refreshing_without_a_cluster():
    cluster = FakeCluster(workers=[{"worker_id": "w-1", "state": "idle"}])
    panel = ClusterPanel(cluster, interval=0.2)
    asyncio.run(_close_while_polling(panel, lambda: cluster.reads["workers"]))


def test_scale_to_the_current_size_keeps_every_worker(mochi):
    panel = ClusterPanel(mochi)
    before = {w["worker_id"]: w["started_at"] for w in mochi.workers()}
    panel.scale_button.click()  # scale_to starts at the pool's size
    assert f"pool kept at {pool_size(mochi)} workers" in panel.message.value and not panel.scale_button.disabled
    assert "load their model" not in panel.message.value
    assert {w["worker_id"]: w["started_at"] for w in mochi.workers()} == before


def test_a_workers_current_job_shows_its_prompt_and_progress(mochi, hold, tiny):
    """The account's own job by its prompt and step (another account's shows by id only: below)."""
    prompt = unique("panel long take")
    gate = hold(prompt, "denoising", step=1)
    job = mochi.generate(prompt, **tiny)
    gate.wait_reached()
    panel = ClusterPanel(mochi)
    cell = next(c for c in panel.table.value.split('class="mochi-current-job"')[1:] if job.id in c)
    assert prompt in cell and "denoising" in cell and "<progress" in cell and "1/2" in cell
    assert "another account" not in cell
    job.cancel(timeout=30)


def test_another_accounts_job_is_shown_by_id_only():
    rows = [{"worker_id": "w-1", "state": "busy", "current_job": "theirs-1", "device": "cpu"},
            {"worker_id": "w-2", "state": "busy", "current_job": "mine-1", "device": "cpu"}]
    mine = FakeJob(record(id="mine-1", params={"prompt": "my own prompt"}))
    panel = ClusterPanel(FakeCluster(workers=rows, jobs=[mine]))
    theirs_cell, mine_cell = panel.table.value.split('class="mochi-current-job"')[1:]
    assert "another account's job" in theirs_cell and "theirs-1" in theirs_cell and "prompt" not in theirs_cell
    assert "my own prompt" in mine_cell and "another account" not in mine_cell


def test_the_queue_is_the_clusters_with_other_accounts_redacted_and_named_only_for_admins():
    now = 1.7e9 + 100
    jobs = [record(id=i, account=a, status="queued", stage="queued", priority=p, created_at=1.7e9 + t,
                   params={"prompt": f"prompt {i}", "width": 64, "height": 48, "num_frames": 13,
                           "num_inference_steps": 30})
            for i, a, p, t in [("urgent", "alice", 5, 90), ("bobs", "bob", 0, 20), ("early", "alice", 0, 10)]]
    seen_by_alice = queue_rows(jobs, "alice", admin=False)
    views = queue_view(seen_by_alice, now=now)
    assert [(v["position"], v["id"], v["mine"]) for v in views] == [(1, "urgent", True), (2, None, False),
                                                                     (3, "early", True)]
    assert views[2]["waiting"] == 90.0 and views[1]["prompt"] is None and views[1]["account"] is None
    queue = ClusterPanel(FakeCluster(queue=seen_by_alice)).queue.value
    assert queue.index("prompt urgent") < queue.index("another account's job") < queue.index("prompt early")
    assert "64x48 &middot; 13 frames &middot; 30 steps" in queue
    assert "bob" not in queue and "<th style=\"text-align: left; padding: 2px 8px\">account</th>" not in queue
    # an admin sees whose each job is (still not their prompts)
    admin = ClusterPanel(FakeCluster(queue=queue_rows(jobs, "carol", admin=True))).queue.value
    assert ">account</th>" in admin and ">bob</td>" in admin and "prompt bobs" not in admin
    assert admin.count("another account's job") == 3


def test_the_summary_names_cpu_or_gpu_workers():
    cpu = ClusterPanel(FakeCluster(workers=[{"worker_id": f"w-{i}", "state": "idle", "device": "cpu"}
                                            for i in range(2)]))
    assert "2 CPU workers" in cpu.summary.value and "GPU" not in cpu.summary.value
    gpu = ClusterPanel(FakeCluster(workers=[{"worker_id": "w-0", "state": "busy", "device": "cuda",
                                             "gpu_name": "NVIDIA H200"}]))
    assert "1 GPU worker</b> (NVIDIA H200)" in gpu.summary.value and "CPU" not in gpu.summary.value


def test_scaling_down_says_the_removed_workers_drain_not_that_new_ones_load():
    assert "load their model" in scaled_message(1, 2) and "from 1 to 2 workers" in scaled_message(1, 2)
    down = scaled_message(2, 1)
    assert "from 2 to 1 worker;" in down and "load" not in down and "finished their running jobs" in down
    panel = ClusterPanel(FakeCluster(workers=[{"worker_id": "w-0", "state": "idle"},
                                              {"worker_id": "w-1", "state": "idle"}]))
    panel.scale(1)  # no running loop: at once
    assert "from 2 to 1 worker" in panel.message.value and "load" not in panel.message.value


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_current_job_the_queue_and_the_summary_escape_what_they_show(payload):
    running = FakeJob(hostile_record(payload, id="r-1", status="running"))
    queued = FakeJob(hostile_record(payload, id="q-1", status="queued"))
    workers = [{"worker_id": "w-1", "state": payload, "current_job": "r-1", "gpu_name": payload},
               {"worker_id": "w-2", "state": "busy", "current_job": payload, "device": payload}]
    hostile_queue = [{k: payload for k in ("position", "account", "id", "prompt", "width", "height", "num_frames",
                                           "steps", "priority", "created_at")} | {"mine": mine} for mine in (True, False)]
    panel = ClusterPanel(FakeCluster(workers=workers, jobs=[running, queued], queue=hostile_queue))
    assert_safe(panel.table.value, payload)  # the prompt of r-1, the id of another account's job
    assert_safe(panel.summary.value, payload)  # a GPU name and a state
    assert_safe(panel.queue.value, payload)


def test_gpu_use_per_worker_and_a_link_to_the_ray_dashboard():
    rows = [{"worker_id": "w-gpu", "state": "busy", "gpu_name": "NVIDIA H100", "gpu_utilization": 0.87,
             "gpu_power_w": 312.4, "gpu_device_memory_used": 30 * 2**30, "gpu_device_memory_total": 80 * 2**30,
             "gpu_memory_used": 1, "gpu_memory_total": 2},
            {"worker_id": "w-cpu", "state": "idle", "rss_bytes": 2**30}]
    panel = ClusterPanel(FakeCluster(workers=rows, dashboard='http://head:8265/?x="<b>'))
    gpu_row, cpu_row = panel.table.value.split("<tbody>")[1].split("</tr>")[:2]
    assert "87 % &middot; 312 W" in gpu_row
    assert "30.00 GiB / 80.00 GiB" in gpu_row  # the device's memory (NVML), not this process's allocation
    assert re.search(r'class="mochi-gpu-use"[^>]*>-</td>', cpu_row)  # no GPU: nothing made up
    assert 'href="http://head:8265/?x=&#34;&lt;b&gt;"' in panel.dashboard.value
    assert ClusterPanel(FakeCluster(workers=rows)).dashboard.value == ""
    cpu_only = ClusterPanel(FakeCluster(workers=rows[1:])).table.value
    assert "GPU" not in cpu_only and "mochi-gpu-use" not in cpu_only  # a CPU pool: no column of dashes


def test_queue_etas_cpu_use_throughput_and_what_each_count_counts():
    from mochi_lab.display.widgets.throughput import Throughput, throughput_html

    done = [FakeJob(record(id=f"d-{i}", status="done", timings={"run_s": 10.0})) for i in range(3)]
    rows = [{"worker_id": "w-0", "state": "busy", "current_job": "r-1", "device": "cpu", "model": "tiny",
             "cpu_percent": 187.4, "jobs_done": 4},
            {"worker_id": "w-1", "state": "idle", "device": "cpu", "model": "tiny", "cpu_percent": 0.0, "jobs_done": 2}]
    running = FakeJob(record(id="r-1", status="running", live={"eta_s": 4.0}))
    queue = [{"position": i, "mine": True, "id": f"q-{i}", "prompt": f"waiting {i}", "model": "tiny", "width": 32,
              "height": 32, "num_frames": 7, "steps": 2, "priority": 0, "created_at": 1.7e9} for i in (1, 2, 3)]

    class Cluster(FakeCluster):
        def jobs(self, status=None, **kw):
            self._read("jobs")
            return {"running": [running], "done": done}.get(status, [])

    panel = ClusterPanel(Cluster(workers=rows, queue=queue))
    # the idle worker takes the 1st now; the busy one frees in 4 s (its job's ETA) and takes the 2nd;
    # the 3rd waits for the idle worker's first job (10 s, the recent median)
    etas = re.findall(r'class="mochi-queue-eta"[^>]*>([^<]*)<', panel.queue.value)
    assert etas == ["now", "~4.0 s", "~10 s"], etas
    assert panel.starts == [0.0, 4.0, 10.0]  # the estimate itself: tests/client/test_queue_eta.py
    # CPU use per worker, in % of one core; the headers that could be misread say what they count
    table = panel.table.value
    assert re.search(r'class="mochi-cpu-use"[^>]*>187 %', table) and "GPU" not in table
    assert 'title="jobs this worker has finished since it started' in table
    assert "this account's jobs</span>: queued" in panel.counts.value
    assert "every account's jobs, in the order workers take them" in panel.queue.value
    # throughput: jobs finished per minute, from the increase of each worker's count between reads
    t = Throughput()
    t.add(rows, now=1000.0)
    t.add([{**rows[0], "jobs_done": 6}, {**rows[1], "jobs_done": 3}], now=1030.0)  # 3 finished
    t.add([{**rows[0], "jobs_done": 0}, {**rows[1], "jobs_done": 4}], now=1100.0)  # w-0 restarted: 1 more
    assert t.per_minute(now=1100.0)[-2:] == [3, 1] and sum(t.per_minute(now=1100.0)) == 4
    assert sum(t.per_minute(now=1100.0 + 700)) == 0  # older than the window: gone
    assert "<svg" in panel.rate.value and "since this panel's first read" in panel.rate.value
    t.since = 0.0  # read for longer than the window: the whole window counts
    assert "finished in the last 10 min" in throughput_html(t, now=1100.0)


def test_the_notebook_file_keeps_the_panels_last_state_with_its_time():
    from mochi_lab.display.reprs import STATIC_MIME
    from mochi_lab.display.widgets.save_hook import strip_live_widgets

    rows = [{"worker_id": "w-0", "state": "idle", "device": "cpu", "model": "tiny", "jobs_done": 1}]
    panel = ClusterPanel(FakeCluster(workers=rows))
    published = []

    class Handle:
        def update(self, bundle, raw):
            published.append(bundle)

    panel._snapshots.append(Handle())
    panel.cluster._workers = [{**rows[0], "state": "busy"}]
    panel.refresh()  # the state changed: the stand-in follows
    (bundle,) = published
    html = bundle[STATIC_MIME]
    assert "mochi-cluster-panel-static" in html and "1 CPU worker" in html and "busy" in html
    assert re.search(r"as read at \d\d:\d\d:\d\d", html) and "need the kernel" in html
    panel.refresh()  # only the clock moved: not sent again at once
    assert len(published) == 1
    nb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": dict(bundle),
                                                        "metadata": {}}]}]}
    strip_live_widgets(nb)
    assert nb["cells"][0]["outputs"][0]["data"]["text/html"] == html


def test_queue_etas_take_any_record_without_failing():
    """The store is a trust boundary: a list where a number belongs, or a job id that is a dict, is no estimate."""
    odd = [[1], {"a": 1}, None, "x", float("nan")]
    done = [FakeJob(record(id=f"d-{i}", status="done", timings={"run_s": v}, params={"width": v, "model": v}))
            for i, v in enumerate([*odd, 5.0])]
    rows = [{"worker_id": "w-0", "state": "busy", "current_job": {"id": 1}, "model": ["tiny"], "jobs_done": [3]},
            {"worker_id": "w-1", "state": "idle", "current_job": None, "model": "tiny", "jobs_done": "many"}]
    queue = [{"position": 1, "mine": True, "id": "q-1", "model": v, "width": v, "created_at": v} for v in odd]
    panel = ClusterPanel(FakeCluster(workers=rows, jobs=done, queue=queue))
    assert panel.queue.value.count('class="mochi-queue-eta"') == len(odd) and panel.message.value == ""
