"""When a queued job should start (`mochi_lab.queue_eta`), and that its two views, the job's place
(`Job.queue_position`) and the cluster panel's "starts in" column, give one answer from the same reads."""

from __future__ import annotations

import math

from mochi_lab import Job
from mochi_lab.display.widgets import ClusterPanel
from mochi_lab.queue_eta import RunTimes, busy_for, queue_starts, row_shape, run_times, serving, shape_key
from tests.support.fakes import FakeCluster, FakeJob, QueueBackend, hostile_record, record
from tests.support.jobkit import TINY
from tests.support.widget_helpers import pool_size, unique

SMALL = {"model": "tiny", "width": 32, "height": 32, "num_frames": 7, "steps": 2}  # fakes.PARAMS' shape, as a row
BIG = {**SMALL, "width": 848, "height": 480}


def row(n: int, **fields) -> dict:
    return {"position": n, "mine": True, "id": f"q-{n}", **SMALL, **fields}


def worker(wid: str, state: str = "idle", model: str | None = "tiny", job: str | None = None) -> dict:
    return {"worker_id": wid, "state": state, "model": model, "current_job": job}


def ran(*seconds: float, **params) -> list:
    """Done records that ran for `seconds`, of fakes.PARAMS' shape with `params` replaced."""
    return [record(id=f"d-{i}-{s}", status="done", timings={"run_s": s}, params=params) for i, s in enumerate(seconds)]


def test_idle_workers_take_the_queue_in_turn():
    times = run_times(ran(8.0, 10.0, 30.0))
    assert (times.every, times.runs, times.of(row_shape(SMALL))) == (10.0, 3, 10.0)
    workers = [worker("w-0"), worker("w-1"), worker("w-2", state="loading")]  # loading: it takes a job when loaded
    assert queue_starts([row(n) for n in range(1, 8)], workers, {}, times) == [0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 20.0]
    # a row's start depends only on the rows before it: the job's own view simulates the queue up to it
    queue = [row(n) for n in range(1, 8)]
    assert queue_starts(queue[:5], workers, {}, times) == queue_starts(queue, workers, {}, times)[:5]
    # the worker rows' order does not matter (a tie goes to the lower worker id)
    assert queue_starts(queue, workers[::-1], {}, times) == queue_starts(queue, workers, {}, times)


def test_each_job_ahead_runs_for_its_shapes_median_and_an_unrun_shape_for_all_runs():
    times = run_times(ran(10.0) + ran(100.0, 120.0, width=848, height=480))
    assert times.of(row_shape(SMALL)) == 10.0 and times.of(row_shape(BIG)) == 110.0 and times.every == 100.0
    queue = [row(1, **BIG), row(2), row(3, width=64), row(4)]
    # one worker: the big job (110 s), the small one (10 s), a 64-wide one never run (all runs' median: 100 s)
    assert queue_starts(queue, [worker("w-0")], {}, times) == [0.0, 110.0, 120.0, 220.0]
    # the size and model decide: another job's prompt, seed or priority does not
    assert run_times(ran(10.0, prompt="other", seed=9)).of(row_shape({**SMALL, "priority": 5})) == 10.0


def test_a_busy_worker_frees_when_its_jobs_eta_says_and_no_guess_is_made_for_one_without():
    workers = [worker("w-0", "busy", job="r-1"), worker("w-1", "busy", job="r-2"), worker("w-2", "busy", job=None)]
    running = [record(id="r-1", live={"eta_s": 4.0}), record(id="r-2", live={"rate": 1.0}),
               record(id="r-3", live={"eta_s": 1.0})]  # r-3: on no worker row (finished since) counts nowhere
    busy = busy_for(workers, running)
    assert busy == {"w-0": 4.0}  # w-1's job has no ETA yet; w-2's is another account's (no id shown)
    times = run_times(ran(10.0))
    queue = [row(1), row(2), row(3)]
    # the one worker whose time is known takes them all: each start is then the latest it should be
    assert queue_starts(queue, workers, busy, times) == [4.0, 14.0, 24.0]
    assert queue_starts(queue, workers[1:], busy, times) == [None, None, None]  # nothing to go by: no guess
    # an idle worker beside them: it takes the first now, the busy one with an ETA the second
    assert queue_starts(queue, [*workers, worker("w-3")], busy, times) == [0.0, 4.0, 10.0]
    # no run time yet: the first still starts now on the idle worker; after it nobody knows
    assert queue_starts(queue, [worker("w-3")], {}, RunTimes()) == [0.0, None, None]
    # workers that take no jobs (an error, stopping) are left out
    assert queue_starts(queue, [worker("w-4", "error")], {}, times) == [None, None, None]


def test_a_worker_takes_only_its_models_jobs():
    workers = [worker("w-p", model="mochi-1-preview"), worker("w-t")]
    times = run_times(ran(10.0) + ran(50.0, model="mochi-1-preview"))
    queue = [row(1), row(2, model="mochi-1-preview"), row(3), row(4, model="mochi-1-preview")]
    assert queue_starts(queue, workers, {}, times) == [0.0, 0.0, 10.0, 50.0]
    assert queue_starts(queue, workers[:1], {}, times) == [None, 0.0, None, 50.0]  # no worker for tiny
    assert queue_starts(queue, [worker("w-any", model=None)], {}, times) == [0.0, 10.0, 60.0, 70.0]  # serves any
    assert serving(workers, "tiny") == 1 and serving(workers + [worker("w-any", model=None)], "tiny") == 2
    assert serving(workers, "other") == 0


def test_records_of_any_shape_are_no_input_never_an_error():
    """The store is a trust boundary, and the rows may come over the network: a list where a number belongs."""
    odd = [[1], {"a": 1}, None, "x", float("nan"), float("inf"), -1.0, True]
    done = [record(id=f"d-{i}", status="done", timings={"run_s": v}, params={"width": v, "model": v})
            for i, v in enumerate(odd)]
    done += [hostile_record([1], id="h-1"), hostile_record("7", id="h-2")]
    times = run_times([*done, "not a record", None, *ran(5.0)])
    assert (times.every, times.runs) == (5.0, 1)  # only the one real run time counts
    assert shape_key([1, [2]]) is None and shape_key(["tiny", 32, None]) == ("tiny", 32, None)
    workers = [{"worker_id": {"id": 1}, "state": ["busy"], "model": ["tiny"], "current_job": {"id": 1}},
               {"worker_id": "w-1", "state": "busy", "model": "tiny", "current_job": ["r-1"]},
               {"worker_id": "w-2", "state": "busy", "model": "tiny", "current_job": "r-2"},
               "not a row", None, [1, 2], {"worker_id": "w-3", "state": "idle", "model": "tiny"}]
    running = [record(id="r-2", live={"eta_s": v}) for v in odd] + [hostile_record([1]), "not a record"]
    busy = busy_for(workers, running)
    assert busy == {}
    queue = [{"position": 1, "model": v, "width": v, "steps": v} for v in odd] + ["not a row", None, [1]]
    starts = queue_starts(queue, workers, {"w-2": [3], "w-1": float("nan")}, times)
    assert all(s is None or (isinstance(s, float) and math.isfinite(s)) for s in starts)
    # only w-3 takes jobs (the busy ones' times are not numbers; a row that is no mapping is no worker), and only
    # those that name no model or its own; each for the one run time known (a row that is no mapping: no model)
    assert starts == [None, None, 0.0, None, None, None, None, None, 5.0, 10.0, 15.0]
    assert serving(workers, "tiny") == 3  # w-1, w-2, w-3: a list is no model name


def test_a_queued_jobs_place_and_the_cluster_panel_give_one_eta():
    """The same reads, through both views: busy workers with and without an ETA, another account's job, shapes of
    their own, a model of its own."""
    alice = [record(id=i, status="queued", stage="queued", params=p)
             for i, p in [("a", {}), ("b", {}), ("c", {"model": "mochi-1-preview"}), ("d", {})]]
    theirs = record(id="theirs", account="bob", status="queued", stage="queued", params={"width": 848, "height": 480})
    queued = [alice[0], theirs, *alice[1:]]
    done = ran(10.0, 12.0) + ran(100.0, width=848, height=480)  # small: 11 s, big: 100 s, all: 12 s
    running = [record(id="r-1", live={"eta_s": 6.0}), record(id="r-2", live={"rate": 1.0})]
    workers = [worker("w-0", "busy", job="r-1"), worker("w-1", "busy", job="r-2"), worker("w-2", "busy"),
               worker("w-3", model="mochi-1-preview"), worker("w-4")]
    backend = QueueBackend(queued, done, workers, running)
    places = {r.id: Job(backend, r).queue_position() for r in alice}

    class Cluster(FakeCluster):
        def jobs(self, status=None, **kw):
            self._read("jobs")
            return [FakeJob(r) for r in {"running": running, "done": done}.get(status, [])]

    panel = ClusterPanel(Cluster(workers=workers, queue=backend.queue()))
    shown = {row["id"]: start for row, start in zip(panel.queued, panel.starts) if row.get("id")}
    # a on the idle tiny worker now (11 s); bob's big job on w-0 when its job ends (6 s); b after a (11 s);
    # c on the preview worker now; d after b (22 s). w-1 (no ETA) and w-2 (another account's) are left out.
    assert {i: p["eta_s"] for i, p in places.items()} == shown == {"a": 0.0, "b": 11.0, "c": 0.0, "d": 22.0}
    assert [places[i]["position"] for i in "abcd"] == [1, 3, 4, 5]
    assert places["c"]["workers"] == 1 and places["a"]["workers"] == 4 and places["a"]["runs_measured"] == 3
    assert panel.queue.value.count('class="mochi-queue-eta"') == 5  # and drawn for every row
    # the job reads the workers and its run times once for many asks (its place is asked for every second)
    job = Job(backend, alice[3])
    reads = dict(backend.reads)
    for _ in range(3):
        assert job.queue_position()["eta_s"] == 22.0
    assert backend.reads["queue"] - reads["queue"] == 3
    assert backend.reads["workers"] - reads["workers"] == 1
    assert backend.reads["list done"] - reads["list done"] == 1
    assert backend.reads["list running"] - reads["list running"] == 1


def test_the_two_views_agree_on_the_real_backend(mochi, hold):
    """Every worker holds a job that has reported its ETA (from the worker's pace on a job it ran before); jobs
    queue behind them. The job's place and the cluster panel, each reading the store, give one ETA for each."""
    word = unique("eta")
    n = pool_size(mochi)
    # one job on every worker first: its pace gives the next job an ETA at the first step, and the runs a time
    warm = hold(f"{word} warm", "denoising", step=1)
    first = [mochi.generate(f"{word} warm", seed=i, **TINY) for i in range(n)]
    warm.wait_reached(n)  # a worker holds one job at a time: each has one
    warm.release()
    for job in first:
        job.result(timeout=120)
    gate = hold(f"{word} held", "denoising", step=1)
    busy = [mochi.generate(f"{word} held", seed=i, **TINY) for i in range(n)]
    gate.wait_reached(n)
    queued = [mochi.generate(f"{word} queued", seed=i, **TINY) for i in range(n + 2)]
    try:
        panel = ClusterPanel(mochi)
        shown = {row.get("id"): start for row, start in zip(panel.queued, panel.starts)}
        etas = []
        for job in queued:
            place = mochi.job(job.id).queue_position()  # a handle of its own: it reads now, as the panel did
            assert place is not None and place["eta_s"] is not None, place
            assert place["eta_s"] == shown[job.id], (place, shown)
            etas.append(place["eta_s"])
        assert etas == sorted(etas) and etas[-1] > etas[0], etas  # in queue order; the last behind a run
    finally:
        for job in busy + queued:
            job.cancel(timeout=0)
        for job in busy + queued:
            job.wait(timeout=120)
