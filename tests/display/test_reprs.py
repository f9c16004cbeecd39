"""Displayed jobs: HTML only (a saved notebook shows them without its kernel), live until they end,
saying when a worker was lost; `wait(progress=True)` says so too; a queued job knows its place."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from pathlib import Path

import pytest

from mochi_lab import Job, JobRecord
from mochi_lab.display.live import LiveView, TextProgress
from mochi_lab.display.notes import RetryTracker
from mochi_lab.display.progress import progress_view
from mochi_lab.display.reprs import WIDGET_MIME, cluster_html
from tests.support.fakes import QueueBackend, record
from tests.support.jobkit import TINY
from tests.support.widget_helpers import drive, pool_size, unique


def test_cluster_repr_is_compact_html(mochi):
    out = mochi._repr_html_()
    assert "MochiCluster" in out and f"<b>{mochi.account}</b>" in out and "tiny" in out and len(out) < 1500
    assert "sqlite" in out and "ray " in out
    # what runs now, read now (as dask's Client shows itself), not the sizing policy
    n = pool_size(mochi)
    assert f"workers <b>{n}</b> CPU" in out and "ready" in out and "serving tiny" in out
    assert "queue <b>" in out and "one per GPU" not in out


def test_cluster_repr_counts_workers_by_state_and_the_queue_and_links_the_dashboard():
    info = {"backend": "direct", "address": "127.0.0.1:6379", "store": "sqlite /x", "account": "alice", "model": "tiny"}
    workers = [{"state": "idle", "device": "cuda", "gpu_name": "NVIDIA H100", "model": "mochi-1-preview"},
               {"state": "busy", "device": "cuda", "gpu_name": "NVIDIA H100", "model": "mochi-1-preview"},
               {"state": "loading", "device": "cuda", "gpu_name": "NVIDIA H100", "model": None}]
    out = cluster_html(info, workers=workers, queue=[{"mine": True}, {"mine": False}, {}],
                       dashboard="http://127.0.0.1:8265")
    assert "workers <b>3</b> GPU (NVIDIA H100) &middot; 1 ready &middot; 1 busy &middot; 1 loading" in out
    assert "serving mochi-1-preview" in out and "error" not in out
    assert "queue <b>3</b> jobs waiting (1 yours)" in out
    assert 'href="http://127.0.0.1:8265"' in out
    empty = cluster_html(info, workers=[], queue=[], dashboard="javascript:alert(1)")
    assert "workers <b>0</b> live: the pool is starting" in empty and "queue <b>0</b> jobs waiting<" in empty
    assert "javascript" not in empty  # only an http(s) link is a link
    unread = cluster_html(info, error="cannot read the pool now: StoreError: down")
    assert "workers" not in unread and "cannot read the pool now" in unread


def test_a_gateway_handles_repr_shows_its_url_and_not_the_servers_store():
    # what GatewayBackend.info() returns (tests/client/test_remote.py pins it): the store and Ray are the server's
    info = {"backend": "gateway", "address": "https://hub.example/services/mochi/", "account": "wendy", "model": "tiny"}
    out = cluster_html(info)
    assert "MochiCluster" in out and "<b>wendy</b>" in out and len(out) < 1000
    assert "gateway https://hub.example/services/mochi/" in out and "store" not in out and "ray " not in out


def test_job_reprs_need_no_store_and_are_html_only(mochi):
    prompt = unique("<script>alert(1)</script>")
    job = mochi.generate(prompt, **TINY)
    queued = job._repr_mimebundle_()
    assert "&lt;script&gt;" in queued["text/html"] and "<script>" not in queued["text/html"]
    job.result(timeout=240)
    offline = Job(None, job.record)  # any backend read would raise AttributeError
    html = offline._repr_html_()
    assert ">done<" in html and "total " in html and Path(job.record.artifacts["video"]).name in html
    assert job.record.meta["worker_id"] in html
    bundle = offline._repr_mimebundle_()  # no widget: a notebook reopened without its kernel shows this
    assert set(bundle) == {"text/plain", "text/html"} and WIDGET_MIME not in bundle
    assert "ftyp" not in bundle["text/plain"] + bundle["text/html"]


class Recorder:
    """Stands in for IPython's display machinery: what a LiveView publishes, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[bool, dict]] = []

    def __call__(self, bundle: dict, update: bool) -> None:
        self.sent.append((update, bundle))

    @property
    def html(self) -> list[str]:
        return [b["text/html"] for _, b in self.sent]


def test_a_displayed_job_stays_live_and_ends_as_static_html_with_its_video(mochi, hold, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernel's cwd is the notebook's folder
    prompt = unique("a lighthouse")
    gate = hold(prompt, "denoising", step=1)
    job = mochi.generate(prompt, **TINY)
    shown = Recorder()
    view = LiveView(job, publish=shown, folder=Path("videos")).start()  # no loop here: the test steps it
    assert shown.sent[0][0] is False and ">done<" not in shown.html[0]  # shown as it was: not ended yet
    drive(view.step, lambda: any("1/2" in h and "denoising" in h for h in shown.html))  # the steps go by
    gate.release()
    drive(view.step, lambda: view.finished)
    assert all(update for update, _ in shown.sent[1:])  # the same output, updated in place
    assert all(a != b for a, b in zip(shown.html, shown.html[1:]))  # only changes are sent
    last = shown.html[-1]
    assert ">done<" in last and "total " in last and "running" not in last
    assert f'<video class="mochi-video" src="./videos/{job.id}.mp4" poster="data:image/jpeg;base64,' in last
    assert f'href="./videos/{job.id}.mp4" download="{job.id}.mp4"' in last
    assert (tmp_path / "videos" / f"{job.id}.mp4").read_bytes() == Path(job.result()).read_bytes()
    n = len(shown.sent)
    assert view.step() is False and len(shown.sent) == n  # ended: no more reads, nothing sent


def test_the_live_view_polls_on_the_event_loop_and_stops_at_the_end(mochi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = mochi.generate(unique("a heron at dawn"), **TINY)
    shown = Recorder()
    threads: set[str] = set()

    def publish(bundle, update):
        threads.add(threading.current_thread().name)
        shown(bundle, update)

    async def main() -> None:
        view = LiveView(job, interval=0.1, publish=publish).start()  # in a running loop: a task keeps it live
        assert view._task is not None
        await asyncio.wait_for(view._task, 240)

    asyncio.run(main())
    assert ">done<" in shown.html[-1] and job.record.status == "done"
    assert threads == {threading.main_thread().name}  # sent from the loop, never a thread


def test_a_lost_worker_is_said_and_the_bar_starts_again(tmp_path, monkeypatch):
    """Real store transitions: a worker claims the job, reaches decoding and dies (its claims are taken
    back); another claims it as attempt 2. `wait(progress=True)` and the live view both say so."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    backend = DirectBackend(Settings.from_env(account="alice"), store)
    rec = store.enqueue("alice", {"prompt": "a kite", **TINY, "num_inference_steps": 10, "seed": 1, "model": "tiny",
                                  "guidance_scale": 4.5, "negative_prompt": ""})
    job = Job(backend, rec)
    seen: list[JobRecord] = []
    watched = threading.Condition()

    def seen_by_the_watcher(status: str, stage: str, step: int, attempts: int) -> None:
        """The next transition waits until the watcher has read this state: none goes by unseen."""
        with watched:
            assert watched.wait_for(lambda: any((r.status, r.stage, r.step, r.attempts) == (status, stage, step, attempts)
                                                for r in seen), timeout=60), (status, stage, step, attempts, seen[-1:])

    def worker_dies_then_another_takes_over() -> None:
        a = store.claim("w-a", lease_s=60)
        for step in (1, 5, 10):
            store.progress(rec.id, a.token, stage="denoising", step=step, total=10)
            seen_by_the_watcher("running", "denoising", step, 1)
        store.progress(rec.id, a.token, stage="decoding", step=10, total=10)
        seen_by_the_watcher("running", "decoding", 10, 1)
        store.release_worker("w-a")  # the worker's process died: the job goes back to the queue
        seen_by_the_watcher("queued", "queued", 10, 1)
        b = store.claim("w-b", lease_s=60)
        store.progress(rec.id, b.token, stage="denoising", step=2, total=10)
        seen_by_the_watcher("running", "denoising", 2, 2)
        store.cancel("alice", rec.id)
        store.finish_cancelled(rec.id, b.token)

    bar = TextProgress()
    shown = Recorder()
    live = LiveView(job, publish=shown)
    marks: list[tuple[int, int]] = []  # (bar position, lines written) after each state
    thread = threading.Thread(target=worker_dies_then_another_takes_over)
    thread.start()
    try:
        for r in backend.watch(rec.id, timeout=60):
            with watched:
                seen.append(r)
                watched.notify_all()
            bar.update(r)
            live.update(r)
            marks.append((bar.bar.n if bar.bar is not None else 0, len(bar.lines)))
    finally:
        thread.join(30)
        bar.close()
    assert bar.lines == ["worker lost at decoding; queued again for attempt 2",
                         "worker lost at decoding; retrying, attempt 2"]
    # the bar in thousandths of the job: no live figures here, so the denoising steps' share
    assert marks[-1][0] == 200 and max(n for n, _ in marks) == 1000
    for (n0, w0), (n1, w1) in zip(marks, marks[1:]):
        assert n1 >= n0 or w1 > w0, marks  # the bar never goes back without a line saying why
    assert any("worker lost at decoding; queued again for attempt 2" in h for h in shown.html)
    assert any("worker lost at decoding; retrying, attempt 2" in h and "2/10" in h for h in shown.html)
    assert "stopped at denoising step 2/10" in shown.html[-1] and "attempt 2" in shown.html[-1]


def test_retry_lines_and_a_silent_worker():
    t = RetryTracker()
    first = record(status="running", stage="denoising", attempts=2)
    t.observe(first)
    assert t.notes(first) == ["worker lost; retrying, attempt 2"]  # re-attached mid-retry: the count says it
    now = time.time()
    silent = record(status="running", stage="decoding", attempts=2, lease_expires_at=now - 12)
    t.observe(silent, now)
    assert "no heartbeat from its worker for 12 s" in t.notes(silent)[-1]
    t.observe(record(status="done", stage="done", attempts=2))
    assert t.notes(record(status="done", attempts=2)) == []  # an ended job: nothing to warn about
    fresh = RetryTracker()
    for r in (record(status="queued", stage="queued", attempts=0), record(status="running", stage="claimed", attempts=1),
              record(status="running", stage="denoising", attempts=1)):
        assert fresh.observe(r) == [] and fresh.notes(r) == []  # a first claim is no retry


def test_queue_position_is_the_place_in_the_clusters_queue_with_an_honest_estimate():
    shape = dict(record().params)
    q = [record(id=i, account=a, status="queued", params=shape)
         for i, a in [("q2", "alice"), ("theirs", "bob"), ("q0", "alice"), ("q1", "alice"), ("q3", "alice")]]
    done = [record(id=f"d{i}", status="done", timings={"run_s": s}, params=shape) for i, s in enumerate([30, 40, 50])]
    done.append(record(id="other", status="done", timings={"run_s": 999}, params={**shape, "width": 848}))
    workers = [{"worker_id": f"w-{i}", "state": "idle", "model": m}
               for i, m in enumerate(["tiny", "tiny", "mochi-1-preview"])]
    backend = QueueBackend(q, done, workers)
    places = {r.id: Job(backend, r).queue_position() for r in q if r.account == "alice"}
    assert [places[i]["position"] for i in ("q2", "q0", "q1", "q3")] == [1, 3, 4, 5]  # bob's job counts too
    assert all(p["queued"] == 5 and p["workers"] == 2 and p["runs_measured"] == 4 for p in places.values())
    # the two tiny workers take the queue in turn, each job for the median run of its size (40 s; the median of
    # all, 45 s, only for a size not run lately): the 1st and bob's now, the 3rd and 4th at 40 s, the 5th at 80 s
    assert [places[i]["eta_s"] for i in ("q2", "q0", "q1", "q3")] == [0.0, 40, 40, 80]
    assert Job(QueueBackend(q, [], []), q[0]).queue_position()["eta_s"] is None  # no worker: no guess
    assert Job(QueueBackend(q, [], workers), q[2]).queue_position()["eta_s"] is None  # no run time for those ahead
    running = dataclasses.replace(q[0], status="running")
    assert Job(QueueBackend([running], [], []), running).queue_position() is None


def test_queued_jobs_know_their_place_on_the_real_backend(mochi, hold):
    """More jobs than workers: every worker holds one, the rest stay queued and are placed in the order
    they were submitted."""
    word = unique("queue")
    busy = []
    for i in range(pool_size(mochi)):
        gate = hold(f"{word} held {i}", "denoising", step=1)
        busy.append(mochi.generate(f"{word} held {i}", seed=i, **TINY))
        gate.wait_reached()
    queued = [mochi.generate(f"{word} {i}", seed=i, **TINY) for i in range(5)]
    try:
        places = [(j, j.queue_position()) for j in reversed(busy + queued)]
        waiting = [(j, p) for j, p in places if p is not None]
        assert [j.id for j, _ in waiting] == [j.id for j in reversed(queued)], places  # the held ones run
        positions = [p["position"] for _, p in waiting]
        assert positions == sorted(positions, reverse=True) and len(set(positions)) == len(positions), positions
        assert positions[-1] >= 1 and all(p["queued"] >= p["position"] and p["workers"] >= 1 for _, p in waiting)
    finally:
        for j in busy + queued:
            j.cancel(timeout=0)
        for j in busy + queued:
            j.wait(timeout=120)


@pytest.fixture(autouse=True)
def _no_download_env(monkeypatch):
    monkeypatch.delenv("MOCHI_LAB_DOWNLOAD_DIR", raising=False)


def test_the_text_bar_shows_the_workers_figures_through_the_decode_not_the_polls(capsys):
    from mochi_lab.display.live import TextProgress
    from mochi_lab.model import JobRecord

    bar = TextProgress()
    base = dict(id="1-000000000000", account="a", params={}, status="running", total_steps=40, attempts=1)
    bar.update(JobRecord(**base, stage="denoising", step=10,
                         live={"rate": 2.5, "eta_s": 12.4, "elapsed_s": 4, "fraction": 0.1}))
    line = str(bar.bar)
    assert bar.bar.n == 100 and line.startswith("denoising 10/40  10%")
    assert line.endswith("| elapsed 4.0 s · ETA 12 s · 2.50 step/s")
    # the decode: the bar and the ETA go on moving as the worker writes its figures again
    for n, (eta, fraction) in enumerate([(9.0, 0.4), (8.5, 0.45)]):
        bar.update(JobRecord(**base, stage="decoding", step=40,
                             live={"rate": 2.5, "eta_s": eta, "elapsed_s": 6 + n / 2, "fraction": fraction}))
        line = str(bar.bar)
        assert bar.bar.n == fraction * 1000 and line.startswith("decoding ") and line.count("decoding") == 1
        assert line.endswith(f"| elapsed {6 + n / 2:.1f} s · ETA {eta:.1f} s")  # no step rate: no steps now
    bar.close()
    err = capsys.readouterr().err
    assert "<" not in err and "it/s" not in err  # tqdm's own poll-timed remaining time and rate are not shown


def test_a_displayed_running_job_shows_its_latest_preview_and_drops_it_for_the_video(tmp_path):
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.display.live import LiveView
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="alice")
    store = open_store(settings.store_url)
    backend = DirectBackend(settings, store, None)
    record = store.enqueue("alice", {"prompt": "<b>p</b>", "num_inference_steps": 8})
    claim = store.claim("w", 60)
    webp = b"RIFF\x10\x00\x00\x00WEBPVP8L" + bytes(16)
    store.put_preview(record.id, claim.token, 4, webp)
    store.progress(record.id, claim.token, stage="denoising", step=4, total=8, live={"preview_step": 4, "eta_s": 2.0})
    sent = []
    view = LiveView(Job(backend, record), publish=lambda bundle, update: sent.append(bundle["text/html"])).start()
    assert 'src="data:image/webp;base64,' in sent[-1] and "preview at step 4" in sent[-1]
    store.complete(record.id, claim.token, artifacts={}, timings={"run_s": 1.0}, meta={})
    view.step()
    assert "data:image/webp" not in sent[-1]  # done: the video (or its summary) takes the preview's place
    store.close()


def test_every_view_of_a_job_draws_its_one_follower_and_a_wait_ends_them_all(mochi, hold, tmp_path, monkeypatch):
    """A live view, a Studio card on another handle of the same job, and a blocking wait: one follower
    reads the job for all of them, so they show the same step, and the wait's reads end the views too
    (a view that followed on its own would lag, or read the job again)."""
    from mochi_lab.display.widgets.job_card import JobCard

    monkeypatch.chdir(tmp_path)
    prompt = unique("one follower")
    gate = hold(prompt, "denoising", step=1)
    job = mochi.generate(prompt, **TINY)
    gate.wait_reached(1)
    shown = Recorder()
    view = LiveView(job, publish=shown, folder=Path("videos")).start()  # no loop: nothing reads it by itself
    card = JobCard(mochi.job(job.id), download_dir=Path("cards"))  # cluster.job(id): another handle
    follower = view.follower
    assert card.follower is follower is job.follower
    reads = follower.reads
    assert card.poll() and follower.reads == reads + 1  # one read, for both views
    assert (card.record.step, job.record.step) == (1, 1) and card.bar.value == progress_view(job.record)["fraction"]
    assert "denoising 1/2" in shown.html[-1] and "denoising 1/2" in card.stage.value
    gate.release()
    reads = follower.reads
    assert job.wait(timeout=120).status == "done"
    assert follower.reads == reads  # the wait's states, not reads of the views' own
    assert card.record.status == "done" and card.video is not None and card.bar.value == 1
    assert ">done<" in shown.html[-1] and f'href="./videos/{job.id}.mp4"' in shown.html[-1]
    assert card.poll() is False and view.step() is False and follower.reads == reads  # ended: no more reads


def _drawn(html: str) -> tuple[str, float | None]:
    """(label, bar) as a job's HTML (the live view's, a ClusterPanel cell) shows them."""
    label = re.search(r'class="mochi-stage"[^>]*>([^<]*)<', html)
    bar = re.search(r'class="mochi-bar" value="([0-9.]+)"', html)
    assert label is not None, html
    return label.group(1), float(bar.group(1)) if bar else None


def test_every_view_of_a_job_shows_the_same_progress_at_the_same_moment(mochi, hold, tmp_path, monkeypatch):
    """The live HTML, a Studio card, the text bar and the ClusterPanel draw one record through one function
    (`progress_view`): the same stage, step and bar. The panel's read, fresher than the views' last one, goes
    to the job's follower, so all of them show it at once, and the panel redraws when the follower reads on
    (it once said 42/200 beside a job at 47/200: it drew its own reads, made at other moments)."""
    from mochi_lab.display.widgets import ClusterPanel
    from mochi_lab.display.widgets.job_card import JobCard

    monkeypatch.chdir(tmp_path)
    prompt = unique("seen alike")
    gate = hold(prompt, "denoising", step=1)
    job = mochi.generate(prompt, **TINY)
    gate.wait_reached()
    shown = Recorder()
    view = LiveView(job, publish=shown, folder=Path("videos")).start()  # no loop: the test steps it
    assert view.control is None  # no kernel: no Cancel button, and nothing breaks
    card = JobCard(mochi.job(job.id), download_dir=Path("cards"))
    text = TextProgress(view.follower)
    panel = ClusterPanel(mochi)

    def views() -> dict[str, tuple[str, float | None]]:
        cell = next(c for c in panel.table.value.split('class="mochi-current-job"')[1:] if job.id in c)
        return {"live view": _drawn(shown.html[-1]), "panel": _drawn(cell),
                "card": (re.fullmatch("<code>(.*)</code>", card.stage.value).group(1), round(card.bar.value, 3)),
                "text bar": (text.bar.desc, text.bar.n / text.UNITS)}

    def alike(label: str) -> None:
        want = (label, round(progress_view(view.record)["fraction"], 3))
        assert views() == dict.fromkeys(("live view", "panel", "card", "text bar"), want), views()

    try:
        alike("denoising 1/2")
        hold(prompt, "decoding", step=None).wait_reached()  # the job goes on; no view has read it since
        reads = view.follower.reads
        panel.refresh()
        assert view.follower.reads == reads  # the panel's read, given to the follower: no read of the views' own
        alike("decoding")
        assert "decoding" not in card.eta.value and "elapsed" in card.eta.value  # the stage is said once
        # the worker writes its figures again while the job decodes; the follower's next read redraws the panel too
        before = view.record.live
        drive(view.step, lambda: view.record.live != before, timeout=60)
        alike("decoding")
        assert view.record.live["elapsed_s"] > before["elapsed_s"]
    finally:
        gate.release()
    assert job.wait(timeout=120).status == "done"
    assert ">done<" in shown.html[-1] and (card.bar.value, text.bar.n, text.bar.desc) == (1, text.UNITS, "done")
    panel.refresh()
    assert panel._followers == {}  # the job has ended: the panel follows it no more
    text.close()
    panel.close()


def test_a_displayed_job_shows_elapsed_and_eta_and_a_cancel_button_that_goes_when_it_ends(mochi, hold, tmp_path,
                                                                                          monkeypatch):
    """While the job runs: its HTML says the stage, the bar, the elapsed time and the ETA, moving on through
    the decode; beside it, in an output of its own, a Cancel button (a widget), which cancels the job and is
    replaced with empty HTML when the job ends, so a saved notebook holds no widget view."""
    monkeypatch.chdir(tmp_path)
    prompt = unique("cancelled from its own output")
    gate = hold(prompt, "decoding", step=None)
    job = mochi.generate(prompt, **TINY)
    gate.wait_reached()
    shown, buttons = Recorder(), Recorder()
    view = LiveView(job, publish=shown, cancel=buttons).start()
    assert [(update, sorted(b)) for update, b in buttons.sent] == [(False, sorted({WIDGET_MIME, "text/plain"}))]
    assert buttons.sent[0][1][WIDGET_MIME]["model_id"] == view.control.button.model_id
    drive(view.step, lambda: "decoding" in _drawn(shown.html[-1])[0] and "elapsed" in shown.html[-1])
    first = re.search(r"elapsed ([0-9.]+) s", shown.html[-1]).group(1)
    assert "ETA" in shown.html[-1]
    drive(view.step, lambda: re.search(r"elapsed ([0-9.]+) s", shown.html[-1]).group(1) != first, timeout=60)
    view.control.button.click()
    assert view.control.button.disabled and view.control.button.description == "Cancelling"
    drive(view.step, lambda: view.finished, timeout=60)
    assert ">cancelled<" in shown.html[-1] and job.record.status == "cancelled" and job.record.artifacts == {}
    assert buttons.sent[-1] == (True, {"text/plain": "", "text/html": ""})  # the button's output, emptied
    assert len(buttons.sent) == 2 and view.control.ended and view.control.button.comm is None
    done = mochi.generate(unique("ends with its button gone"), **TINY)
    other = LiveView(done, publish=Recorder(), cancel=(ended := Recorder())).start()
    drive(other.step, lambda: other.finished)
    assert ended.sent[-1] == (True, {"text/plain": "", "text/html": ""}) and done.record.status == "done"


def test_a_follower_keeps_its_views_through_a_brief_outage_and_says_a_deleted_job(tmp_path):
    """Reads that fail are ridden out (the views keep the last state), and a deleted job ends every view."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.client.follow import MAX_ERRORS
    from mochi_lab.config import Settings
    from mochi_lab.display.widgets.job_card import JobCard
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="alice")
    store = open_store(settings.store_url)
    backend = DirectBackend(settings, store, None)
    rec = store.enqueue("alice", {"prompt": "a kite", **TINY, "seed": 1})
    job = Job(backend, rec)
    shown = Recorder()
    view = LiveView(job, publish=shown).start()
    card = JobCard(Job(backend, rec), download_dir=tmp_path)
    backend.store = open_store("redis://127.0.0.1:1/0")  # the store goes away for a moment: nothing listens there
    assert view.step() and card.poll() and view.follower.errors == 2 and not view.finished
    assert "a kite" in shown.html[-1] and card.record.status == "queued"  # the last state read stays
    backend.store = store
    claim = store.claim("w", 60)
    store.progress(rec.id, claim.token, stage="denoising", step=1, total=2)
    assert card.poll() and view.follower.errors == 0
    assert "denoising 1/2" in shown.html[-1] and card.bar.value == 0.5  # no live figures: the steps' share
    store.delete("alice", rec.id)
    assert card.poll() is False and card.gone and view.gone and "deleted" in shown.html[-1]
    assert card.eta.value == "deleted"
    assert MAX_ERRORS > 1
    store.close()


def test_a_card_reads_nothing_while_the_jobs_follower_task_reads_it_for_every_view():
    """On the kernel's loop, a displayed job's follower has one task; a Studio card of the same job then
    only draws what that task read (a card that polled on its own would read the job twice per tick)."""
    from mochi_lab.display.widgets.job_card import JobCard
    from tests.support.fakes import FakeJob

    running = record(status="running", stage="denoising", step=1, total_steps=3, attempts=1)
    job = FakeJob(running, history=[dataclasses.replace(running, step=2), dataclasses.replace(running, step=3),
                                    dataclasses.replace(running, status="cancelled", stage="cancelled", step=3)])
    shown = Recorder()

    async def main() -> JobCard:
        view = LiveView(job, publish=shown).start()
        assert view.follower.running  # its task keeps it live
        card = JobCard(job)
        before = job.refreshes
        assert card.poll() and job.refreshes == before  # the card read nothing: the follower's task reads
        await view.follower.wait(timeout=30)
        return card

    card = asyncio.run(main())
    assert job.refreshes == card.follower.reads  # every read of the job was the follower's
    assert card.record.status == "cancelled" and card.bar.bar_style == "warning"
    note = "stopped after denoising (3/3 steps), before its video was written"
    assert note in card.notes.value and note in shown.html[-1]


def test_a_cold_start_shows_each_step_with_its_seconds_then_the_model_loading_then_ready():
    from mochi_lab.display.startup import StartProgress

    now = [100.0]
    sent: list[tuple[bool, dict]] = []
    shown = StartProgress(publish=lambda bundle, update: sent.append((update, bundle)), clock=lambda: now[0])
    shown("store", "sqlite /x")
    now[0] += 0.1
    shown("ray", "on 127.0.0.1, for this process")
    now[0] += 12.0
    shown("pool", "model tiny")
    assert [u for u, _ in sent] == [False, True, True]  # one output, updated in place
    html = sent[-1][1]["text/html"]
    assert html.count("&#10003;") == 2 and "starting Ray" in html and "12 s" in html and "&hellip;" in html
    rows = [{"worker_id": "w-0", "state": "loading", "model": "tiny"}, {"worker_id": "w-1", "state": "loading"}]
    now[0] += 0.5
    assert shown.follow(lambda: rows, "tiny") is False  # no running loop here: one look, then the caller drives
    assert "loading the model" in sent[-1][1]["text/html"] and "tiny on 2 workers" in sent[-1][1]["text/html"]
    rows[0]["state"] = "idle"
    assert shown.check(lambda: rows, "tiny") is True  # one still loading: follow on
    assert "(1 ready)" in sent[-1][1]["text/html"]
    now[0] += 6.0
    rows[1].update(state="idle", model="tiny")
    assert shown.check(lambda: rows, "tiny") is False
    html = sent[-1][1]["text/html"]
    assert "<b>ready</b>" in html and "2 workers serving tiny" in html and "19 s in all" in html
    assert "&hellip;" not in html and html.count("&#10003;") == 5


def test_a_start_that_fails_says_which_step_failed():
    from mochi_lab.display.startup import StartProgress

    now = [0.0]
    sent: list[dict] = []
    shown = StartProgress(publish=lambda bundle, update: sent.append(bundle), clock=lambda: now[0])
    shown("store", "sqlite /x")
    shown("ray", "on 127.0.0.1")
    now[0] += 75.0
    shown.failed(Exception("The current node timed out during startup.\nmore"))
    html = sent[-1]["text/html"]
    assert "&#10007;" in html and "&hellip;" not in html
    assert "failed: Exception: The current node timed out during startup. (after 75 s)" in html


def test_a_start_in_a_kernel_shows_its_progress_and_elsewhere_nothing(monkeypatch):
    from mochi_lab.client import cluster as handle
    from mochi_lab.display import startup

    assert handle._start_progress(None) is None  # a test, a script: nothing shown
    assert handle._start_progress(False) is None
    monkeypatch.setattr(startup, "in_kernel", lambda: True)
    assert isinstance(handle._start_progress(None), startup.StartProgress)
    assert handle._start_progress(False) is None


def test_a_job_cancelled_while_decoding_says_it_stopped_after_denoising_not_at_a_step():
    """A cancel seen while the worker decodes stops the job before its MP4; its record keeps the last step
    (2/2) and the stage "cancelled", so its note must not read as a cancel in the middle of denoising."""
    from mochi_lab.display.notes import stopped_note

    during = record(status="cancelled", stage="cancelled", step=1, total_steps=2, started_at=1.7e9)
    after = record(status="cancelled", stage="cancelled", step=2, total_steps=2, started_at=1.7e9)
    assert stopped_note(during) == "stopped at denoising step 1/2"
    assert stopped_note(after) == "stopped after denoising (2/2 steps), before its video was written"


def test_the_progress_and_the_notes_still_import_from_reprs():
    """They have their own modules now; code written before imports them from reprs."""
    from mochi_lab.display import notes, progress, reprs

    for name in ("RetryTracker", "ordinal", "queue_note", "stopped_note"):
        assert getattr(reprs, name) is getattr(notes, name) and name in reprs.__all__
    assert reprs.progress_view is progress.progress_view and "progress_view" in reprs.__all__
