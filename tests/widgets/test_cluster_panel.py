"""The cluster panel shows the live workers and refreshes only while the front end shows a view."""

from __future__ import annotations

import asyncio
import re

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


def test_closing_stops_refreshing(mochi):
    panel = ClusterPanel(mochi, interval=0.1)

    async def main() -> None:
        panel._view_count = 1
        await asyncio.sleep(0.15)
        panel.close()
        await asyncio.sleep(0.05)
        assert not panel.poller.running

    asyncio.run(main())


def test_scale_to_the_current_size_keeps_every_worker(mochi):
    panel = ClusterPanel(mochi)
    before = {w["worker_id"]: w["started_at"] for w in mochi.workers()}
    panel.scale_button.click()  # scale_to starts at the pool's size
    assert "pool scaled to 4" in panel.message.value and not panel.scale_button.disabled
    assert {w["worker_id"]: w["started_at"] for w in mochi.workers()} == before
