"""The cluster panel shows the live workers and refreshes only while the front end shows a view."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from fakes import FakeCluster

from mochi_lab.widgets import ClusterPanel


def test_table_lists_every_live_worker(mochi):
    panel = ClusterPanel(mochi)
    workers = mochi.workers()
    assert len(workers) == 4
    body = panel.table.value.split("<tbody>")[1]
    assert len(re.findall("<tr>", body)) == len(workers)
    for w in workers:
        assert w["worker_id"] in body
    assert re.search(r"(idle|busy)", body) and "tiny" in body
    assert all(f"{s} <b>" in panel.counts.value for s in ("queued", "running", "done", "failed", "cancelled"))
    assert panel.scale_to.value == 4


def test_refreshes_while_a_view_is_shown_and_stops_when_it_goes(mochi):
    panel = ClusterPanel(mochi, interval=0.1)

    async def main() -> None:
        await asyncio.sleep(0.35)
        assert not panel.poller.running  # no front end has shown it: no store reads
        start = panel.refreshes
        panel._view_count = 1  # what JupyterLab sends when it renders a view
        await asyncio.sleep(0.55)
        assert panel.poller.running and panel.refreshes >= start + 3
        panel._view_count = 0  # the output was cleared or the notebook closed
        await asyncio.sleep(0.05)
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
    await asyncio.sleep(0.5)
    task = panel.poller._task
    assert task is not None and not task.done() and reads() >= 2
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
    assert "pool scaled to 4" in panel.message.value and not panel.scale_button.disabled
    assert {w["worker_id"]: w["started_at"] for w in mochi.workers()} == before
