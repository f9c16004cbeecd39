"""The History browser lists, filters, plays, re-runs and deletes real jobs of the session cluster."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mochi_lab import JobNotFound
from mochi_lab.display.widgets import History, HistoryRow, jobs_frame
from mochi_lab.video import read_frames
from tests.support.fakes import PNG, FakeCluster, FakeJob, record
from tests.support.gate import Gate
from tests.support.jobkit import TINY
from tests.support.widget_helpers import drive, unique


@pytest.fixture(scope="module")
def made(mochi):
    """Two done jobs (one in an experiment) and one cancelled job, all sharing a unique word."""
    word = unique("history")
    red = mochi.generate(f"{word} red ball", seed=1, **TINY)
    blue = mochi.generate(f"{word} blue ball", seed=2, experiment=f"exp-{word}", **TINY)
    with Gate(f"{word} slow", "denoising", step=1) as gate:  # the module's fixture: `hold` is per test
        slow = mochi.generate(f"{word} slow", seed=3, **TINY)
        gate.wait_reached()
        slow.cancel()
    for job in (red, blue, slow):
        job.wait(timeout=240)
    assert (red.status, blue.status, slow.status) == ("done", "done", "cancelled")
    return word, red, blue, slow


def rows(history: History) -> list[HistoryRow]:
    return [r for r in history.rows if isinstance(r, HistoryRow)]


def test_lists_the_accounts_jobs_newest_first_with_thumbnails(mochi, made):
    word, red, blue, slow = made
    history = History(mochi, text=word)
    assert [r.job.id for r in rows(history)] == [slow.id, blue.id, red.id]
    by_id = {r.job.id: r for r in rows(history)}
    assert by_id[red.id].thumbnail.value == red.thumbnail  # PNG bytes from the backend
    assert by_id[red.id].thumbnail.value[:4] == b"\x89PNG"
    assert by_id[slow.id].play_button.disabled and not by_id[red.id].play_button.disabled
    assert "cancelled" in by_id[slow.id].info.value and f"{word} red ball" in by_id[red.id].info.value


def test_filters_by_status_text_and_experiment(mochi, made):
    word, red, blue, slow = made
    history = History(mochi, text=word)
    assert history.status.label == "all"  # the "every status" choice is labelled, not blank
    history.status.value = "done"
    assert {r.job.id for r in rows(history)} == {red.id, blue.id}
    history.status.value = "cancelled"
    assert [r.job.id for r in rows(history)] == [slow.id]
    history.status.value = "all"
    assert {r.job.id for r in rows(history)} == {red.id, blue.id, slow.id}
    history.text.value = f"{word} RED"  # case-insensitive prompt substring
    assert [r.job.id for r in rows(history)] == [red.id]
    history.text.value = ""
    history.experiment.value = f"exp-{word}"
    assert [r.job.id for r in rows(history)] == [blue.id]
    history.experiment.value = "no-such-experiment"
    assert rows(history) == [] and "no jobs match" in history.table.children[0].value


def test_pages(mochi, made):
    word, red, blue, slow = made
    history = History(mochi, text=word, limit=2)
    assert [r.job.id for r in rows(history)] == [slow.id, blue.id]
    assert history.prev_button.disabled and not history.next_button.disabled
    history.next_button.click()
    assert [r.job.id for r in rows(history)] == [red.id] and history.next_button.disabled
    history.prev_button.click()
    assert len(rows(history)) == 2


def test_play_opens_the_video_under_its_row_and_close_removes_it(mochi, made, tmp_path):
    word, red, blue, _ = made
    history = History(mochi, text=word)
    by_id = {r.job.id: r for r in rows(history)}
    by_id[red.id].play_button.click()
    (player,) = by_id[red.id].detail.children  # under the row it came from, nowhere else
    assert player is history.player and by_id[blue.id].detail.children == ()
    (caption, close), video = player.children[0].children, player.children[1]
    assert red.id in caption.value and video.value == red.save(tmp_path).read_bytes()
    history.refresh()  # a re-listed table keeps the player under its row
    assert {r.job.id: r for r in rows(history)}[red.id].detail.children == (player,)
    close.click()
    assert history.player is None and history.playing is None
    assert all(r.detail.children == () for r in rows(history))


def test_rerun_queues_the_same_params_and_makes_the_same_video(mochi, tmp_path):
    word = unique("again")
    first = mochi.generate(word, seed=9, **TINY)
    first.result(timeout=240)
    history = History(mochi, text=word, download_dir=tmp_path)
    rows(history)[0].rerun_button.click()
    (card,) = history.stack.cards
    assert card.job.id != first.id and card.job.record.params == first.record.params  # seed included
    drive(history.poll_once, lambda: card.finished)
    assert card.record.status == "done"
    assert np.array_equal(read_frames(card.job.result()), read_frames(first.result()))
    # the finished re-run re-listed the table; its card stays under the row it came from
    new_row, source = rows(history)
    assert (new_row.job.id, source.job.id) == (card.job.id, first.id)
    assert source.detail.children == (card,) and new_row.detail.children == ()


def test_delete_needs_a_second_click_and_removes_job_and_files(mochi, made, tmp_path):
    word = unique("doomed")
    job = mochi.generate(word, **TINY)
    video = job.result(timeout=240)
    history = History(mochi, text=word)
    row = rows(history)[0]
    row.delete_button.click()
    assert row.armed and row.delete_button.description == "Confirm"
    assert mochi.job(job.id).status == "done"  # one click deletes nothing
    row.delete_button.click()
    with pytest.raises(JobNotFound):
        mochi.job(job.id)
    assert not video.exists() and rows(history) == []


def test_dataframe_has_one_row_per_job(mochi, made):
    word, red, blue, slow = made
    history = History(mochi, text=word)
    df = history.dataframe()
    assert list(df["id"]) == [slow.id, blue.id, red.id]
    assert {"status", "prompt", "num_frames", "seed", "run_s", "video", "experiment"} <= set(df.columns)
    assert list(df["status"]) == ["cancelled", "done", "done"] and list(df["seed"]) == [3, 2, 1]
    assert df.loc[df["id"] == blue.id, "experiment"].item() == f"exp-{word}"
    assert jobs_frame(mochi.jobs(text=word)).equals(df)


def test_rows_without_a_cluster_read_each_thumbnail_once_and_play_only_done_jobs(tmp_path):
    done = FakeJob(record(id="d-1", status="done", stage="done"))
    queued = FakeJob(record(id="q-1", status="queued", stage="queued"))
    reads = {"n": 0}
    thumbnail = type(done).thumbnail

    class Counted(FakeJob):
        @property
        def thumbnail(self):
            reads["n"] += 1
            return thumbnail.fget(self)

    done.__class__ = Counted
    cluster = FakeCluster(jobs=[queued, done], experiments=["exp-a"])
    history = History(cluster, download_dir=tmp_path)
    by_id = {r.job.id: r for r in rows(history)}
    assert by_id["d-1"].thumbnail.value == PNG and not by_id["d-1"].play_button.disabled
    assert by_id["q-1"].play_button.disabled and "background" in by_id["q-1"].thumbnail.value  # a placeholder
    history.refresh()
    assert reads["n"] == 1  # paging and re-listing reuse the bytes
    assert history.experiment.options == ("exp-a",)
    history.play(queued)
    assert "cannot play q-1" in history.error.value and history.playing is None
    history.play(done)
    assert history.error.value == "" and history.playing == "d-1"
    assert history.player.children[1].value == done._video
    assert by_id["d-1"].detail.children == () and rows(history)[1].detail.children == (history.player,)
    row = by_id["d-1"]
    row.delete_button.click()
    assert cluster.reads.get("delete") is None  # armed only
    row.delete_button.click()
    assert [r.job.id for r in rows(history)] == ["q-1"] and history.playing is None


def test_the_player_moves_to_the_row_played_and_closes_when_its_row_leaves_the_page(tmp_path):
    a = FakeJob(record(id="a-1", status="done", stage="done"))
    b = FakeJob(record(id="b-1", status="done", stage="done"))
    history = History(FakeCluster(jobs=[a, b]), limit=1, download_dir=tmp_path)
    history.play(a)
    first = history.player
    assert rows(history)[0].detail.children == (first,)
    history.next_button.click()  # b's page: a's row is gone, so is its player
    assert history.player is None and history.playing is None and rows(history)[0].detail.children == ()
    history.play(b)
    assert rows(history)[0].detail.children == (history.player,) and history.player is not first


def test_a_rerun_card_opens_under_its_row_and_moves_below_the_table_when_the_row_is_not_shown(tmp_path):
    a = FakeJob(record(id="a-1", status="done", stage="done"))
    b = FakeJob(record(id="b-1", status="done", stage="done"))
    history = History(FakeCluster(jobs=[a, b]), limit=1, download_dir=tmp_path)
    (row,) = rows(history)
    row.rerun_button.click()
    (card,) = history.stack.cards
    assert card.job.id == "a-1-again"
    assert rows(history)[0].detail.children == (card,) and history.others.children == ()
    history.next_button.click()
    assert rows(history)[0].job.id == "b-1" and rows(history)[0].detail.children == ()
    assert history.others.children == (card,)  # never lost: below the table
    history.prev_button.click()
    assert rows(history)[0].detail.children == (card,) and history.others.children == ()
    assert history.stack not in history.children  # each card shows once, under its row
    card.clear()  # the card's own "remove" (the job is not touched)
    assert rows(history)[0].detail.children == () and history.rerun_cards == {}
    history.refresh()
    assert rows(history)[0].detail.children == () and history.others.children == ()


def test_the_all_filter_is_labelled_and_a_none_status_means_all(tmp_path):
    history = History(FakeCluster(), download_dir=tmp_path)
    assert (history.status.value, history.status.label) == ("all", "all")
    assert History(FakeCluster(), status="done", download_dir=tmp_path).status.label == "done"
    history.status.value = "failed"
    history.status.value = None  # what the old API took for "all"
    assert (history.status.value, history.status.label) == ("all", "all")


def test_a_running_jobs_row_shows_the_video_as_it_forms(mochi, hold, tiny):
    word = unique("forming")
    gate = hold(word, "denoising", step=1)  # the worker stores step 1's preview before it reports the step
    job = mochi.generate(word, seed=4, **tiny)
    gate.wait_reached()
    assert job.progress["preview_step"] == 1, job.record
    (row,) = rows(History(mochi, text=word))
    assert row.thumbnail.format == "webp" and row.thumbnail.value[:4] == b"RIFF"
    assert row.job.record.status == "running"
    job.cancel()


def test_the_notebook_file_keeps_the_last_listing_with_thumbnails_and_links(tmp_path):
    import io

    from PIL import Image

    from mochi_lab.display.reprs import STATIC_MIME

    png = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(png, format="PNG")
    done = FakeJob(record(id="d-1", status="done", params={"prompt": "a <b>red</b> kite"}), thumbnail=png.getvalue())
    running = FakeJob(record(id="r-1", status="running", params={"prompt": "a slow boat"}))
    history = History(FakeCluster(jobs=[done, running]), download_dir=tmp_path / "videos")
    published = []

    class Handle:
        def update(self, bundle, raw):
            published.append(bundle)

    history._snapshots.append(Handle())
    html = history.static_html()
    assert "mochi-history-static" in html and html.count("mochi-history-static-row") == 2
    assert "a &lt;b&gt;red&lt;/b&gt; kite" in html and "a slow boat" in html
    assert 'src="data:image/jpeg;base64,' in html  # the done row's thumbnail, small
    assert re.search(r"as listed at \d\d:\d\d:\d\d", html) and "need the kernel" in html
    assert "Play copies it" in html and "mochi-download" not in html  # no copy beside the notebook yet
    history.play(done)  # Play copies the video beside the notebook: the saved listing links it
    assert (tmp_path / "videos" / "d-1.mp4").is_file()
    html = published[-1][STATIC_MIME]
    assert 'class="mochi-download"' in html and "d-1.mp4" in html and "Play copies it" not in html
