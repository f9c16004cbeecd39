"""The experiment layer on both backends (SQLite, Redis), with the store contract standing in for workers."""

import json
import time

import pandas as pd
import pytest

from mochi_lab import Experiment, ExperimentNotFound
from mochi_lab.client.experiment import MISSING
from mochi_lab.store import open_store
from mochi_lab.store.cache import cached_enqueue
from tests.support.exp_helpers import backend, finish

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}


def open_exp(store, name="sweep-1", account="alice", **kw) -> Experiment:
    return Experiment.open(backend(store, account), name, **kw)


def test_create_reopen_and_list_newest_first(store, store_url):
    a = open_exp(store, "first", description="d1", tags=["x"])
    time.sleep(0.01)
    open_exp(store, "second")
    again = open_exp(open_store(store_url), "first")  # another handle, as another process would
    assert (again.description, again.tags, again.created_at) == ("d1", ["x"], a.created_at)
    assert [e["name"] for e in store.list_experiments("alice")] == ["second", "first"]
    open_exp(store, "first", tags=["y"])  # given tags replace the stored ones; the order stays
    assert open_exp(store, "first").tags == ["y"]
    assert [e["name"] for e in store.list_experiments("alice")] == ["second", "first"]


def test_another_account_cannot_open_or_see_an_experiment(store):
    exp = open_exp(store, "secret", account="alice")
    exp.sweep(["alice's prompt"], [1], **TINY)
    with pytest.raises(ExperimentNotFound):
        Experiment.open(backend(store, "bob"), "secret", create=False)
    assert store.list_experiments("bob") == []
    bobs = Experiment.open(backend(store, "bob"), "secret")  # bob gets his own, empty experiment of that name
    assert bobs.runs == [] and bobs.status()["queued"] == 0
    assert len(open_exp(store, "secret").runs) == 1


def test_sweep_is_idempotent_and_links_jobs(store):
    exp = open_exp(store, tags=["demo"])
    jobs = exp.sweep(["a cat", "a dog"], [1, 2], **TINY)
    assert len(jobs) == 4
    again = open_exp(store).sweep(["a cat", "a dog"], [1, 2], **TINY)
    assert [j.id for j in again] == [j.id for j in jobs]
    assert exp.add(prompt="a dog", seed=2, **TINY).id == jobs[3].id
    stored = store.list("alice", experiment="sweep-1")
    assert len(stored) == 4
    assert {j.experiment for j in stored} == {"sweep-1"} and all(j.tags == ["demo"] for j in stored)
    assert [r.job_id for r in exp.runs] == [j.id for j in jobs]
    assert exp.status() == {"queued": 4, "running": 0, "done": 0, "failed": 0, "cancelled": 0, MISSING: 0}


def test_sweep_without_seeds_repeats_its_seeds(store):
    first = open_exp(store).sweep(["a cat"], None, **TINY)
    second = open_exp(store).sweep(["a cat"], None, **TINY)
    assert first[0].id == second[0].id and isinstance(first[0].params.seed, int)


def test_resume_requeues_only_failed_cancelled_and_missing(store, sample_mp4):
    exp = open_exp(store)
    jobs = exp.sweep(["p"], [1, 2, 3, 4, 5], **TINY)
    done_id = finish(store, "done", video=sample_mp4)
    failed_id = finish(store, "failed")
    running_id = finish(store, "running")
    jobs[3].cancel()
    store.delete("alice", jobs[4].id)  # a deleted job leaves its run missing
    assert exp.status() == {"queued": 0, "running": 1, "done": 1, "failed": 1, "cancelled": 1, MISSING: 1}
    requeued = exp.resume()
    assert len(requeued) == 3
    assert failed_id not in {j.id for j in requeued} and jobs[3].id not in {j.id for j in requeued}
    assert [j.params.seed for j in requeued] == [2, 4, 5]
    runs = {r.params["seed"]: r for r in exp.runs}
    assert (runs[1].job_id, runs[3].job_id) == (done_id, running_id)  # left alone
    assert (runs[2].attempt, runs[4].attempt, runs[5].attempt) == (1, 1, 0)
    assert exp.status() == {"queued": 3, "running": 1, "done": 1, "failed": 0, "cancelled": 0, MISSING: 0}
    assert exp.resume() == []  # nothing left to re-queue
    # the failed and cancelled attempts stay in history, linked to the experiment: 5 - 1 deleted + 3
    assert len(store.list("alice", experiment="sweep-1")) == 7


def test_cancel_stops_every_unfinished_run(store):
    exp = open_exp(store)
    exp.sweep(["p"], [1, 2, 3], **TINY)
    finish(store, "running")
    assert exp.cancel() == 3
    counts = exp.status()
    assert counts["cancelled"] == 2 and counts["running"] == 1  # a running job stops at its next step
    assert store.get("alice", exp.runs[0].job_id).cancel_requested


def test_a_killed_client_leaves_runs_that_resume_finds(store):
    exp = open_exp(store)
    runs = exp.sweep(["p"], [1, 2, 3], **TINY)
    # as if the client died after queueing two jobs, before recording any job id
    record = store.get_experiment("alice", "sweep-1")
    for r in record["runs"]:
        r["job_id"] = None
    store.put_experiment("alice", record)
    store.delete("alice", runs[2].id)
    fresh = open_exp(store)
    assert fresh.status()[MISSING] == 1
    assert [r.job_id for r in fresh.runs] == [runs[0].id, runs[1].id, None]  # found by idempotency key
    assert [j.params.seed for j in fresh.resume()] == [3]


def test_wait_outside_a_notebook_draws_a_text_bar_over_the_runs(store, sample_mp4, capsys):
    """A terminal gets tqdm's text bar; a notebook gets the live table (HTML, which a saved notebook keeps: the
    rendered example notebooks, checked in tests/test_docs.py, hold no widget)."""
    exp = open_exp(store)
    exp.sweep(["a cat", "a dog"], [1], **TINY)
    finish(store, "done", video=sample_mp4)
    finish(store, "failed")
    assert exp.wait(timeout=10) == {**exp.status(), "done": 1, "failed": 1}
    bar = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert bar.startswith("sweep-1: 100%") and "2/2" in bar and "done=1" in bar and "failed=1" in bar, bar


def test_wait_and_dataframe_and_export(store, sample_mp4, tmp_path):
    exp = open_exp(store)
    exp.sweep(["a cat", "a dog"], [1], **TINY)
    finish(store, "done", video=sample_mp4)
    finish(store, "failed")
    counts = exp.wait(timeout=10, progress=False)
    assert counts["done"] == 1 and counts["failed"] == 1
    df = exp.to_dataframe(all_columns=True)
    assert list(df["prompt"]) == ["a cat", "a dog"] and list(df["status"]) == ["done", "failed"]
    assert df.loc[0, "denoise_s"] == 0.5 and df.loc[0, "video"].endswith(f"{df.loc[0, 'job_id']}.mp4")
    assert pd.isna(df.loc[1, "video"]) and df.loc[1, "error"] == "RuntimeError: boom"
    assert df["created_at"].dt.tz is not None and (df["num_frames"] == 7).all()
    out = exp.export(tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.csv", "manifest.json", f"000_{exp.runs[0].key}.mp4"])  # only done videos
    assert (out / f"000_{exp.runs[0].key}.mp4").read_bytes() == sample_mp4.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"]["name"] == "sweep-1" and manifest["varying"] == ["prompt"]
    assert [r["status"] for r in manifest["runs"]] == ["done", "failed"]
    csv = pd.read_csv(out / "manifest.csv")
    assert list(csv["job_id"]) == list(df["job_id"])


def counting_backend(store, outcomes=("done",)):
    """alice's direct backend that counts its reads, and after each listing plays a worker ending the next
    queued job (outcomes in turn): the next listing sees it ended, so ticks are counted, never timed."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings

    turns = iter(list(outcomes) * 100)

    class Counting(DirectBackend):
        gets = lists = 0

        def get(self, job_id):
            self.gets += 1
            return super().get(job_id)

        def list(self, **kw):
            self.lists += 1
            out = super().list(**kw)
            if store.counts("alice")["queued"]:
                finish(store, next(turns))
            return out

    return Counting(Settings.from_env(account="alice"), store)


def test_wait_reads_one_listing_per_tick_and_never_a_job_by_id(store):
    """Experiment.wait follows its runs together: each tick is one listing of the experiment's jobs, however
    many runs are pending."""
    counting = counting_backend(store)
    exp = Experiment.open(counting, "sweep-1")
    exp.sweep(["a cat", "a dog", "a cow"], [1], **TINY)
    counting.gets = counting.lists = 0
    counts = exp.wait(timeout=30, progress=False)
    assert counts["done"] == 3
    assert counting.gets == 0  # no run is read on its own
    # the snapshot, one listing per tick while any run was pending (3), and status()'s
    assert counting.lists == 1 + 3 + 1


class Shown:
    def __init__(self):
        self.sent = []

    def __call__(self, bundle, update):
        self.sent.append((update, bundle["text/html"]))

    @property
    def last(self) -> str:
        return self.sent[-1][1]


def test_a_swept_list_is_a_live_table_until_its_runs_end_with_failures_called_out(store):
    counting = counting_backend(store, outcomes=("done", "failed", "done"))
    exp = Experiment.open(counting, "sweep-1")
    jobs = exp.sweep(["a cat", "a dog", "a cow"], [1], **TINY)
    shown = Shown()
    counting.gets = counting.lists = 0
    table = jobs.live(publish=shown).start()  # no loop here: the test steps it
    assert "0/3 finished" in shown.last and "3 queued" in shown.last and "failed" not in shown.last
    assert table.step() and "1/3 finished" in shown.last
    assert table.step() and "2/3 finished" in shown.last
    assert "1 failed</b>: RuntimeError: boom" in shown.last  # called out above the table
    assert not table.step() and table.finished
    assert "3/3 finished" in shown.last and "queued" not in shown.last and "running" not in shown.last
    assert [u for u, _ in shown.sent] == [False, True, True, True]  # one output, updated in place
    assert counting.gets == 0 and counting.lists == 1 + 3  # the first look, then one listing per tick
    assert not table.step() and counting.lists == 4  # ended: nothing more is read


def test_a_displayed_experiment_is_kept_live_on_the_event_loop_until_its_runs_end(store):
    import asyncio
    import threading

    counting = counting_backend(store)
    exp = Experiment.open(counting, "sweep-1", description="live")
    exp.sweep(["a cat", "a dog"], [1], **TINY)
    shown = Shown()
    threads = set()

    def publish(bundle, update):
        threads.add(threading.current_thread().name)
        shown(bundle, update)

    async def main():
        table = exp.live(publish=publish).start()
        assert table.group.running  # a task on this loop keeps it live
        await table.wait(timeout=30)
        return table

    table = asyncio.run(main())
    assert table.finished and "2/2 finished" in shown.last and "live" in shown.last
    assert "0/2 finished" in shown.sent[0][1]
    assert threads == {threading.main_thread().name}
    assert counting.gets == 0


def test_wait_times_out_and_warns_about_missing_runs(store):
    exp = open_exp(store)
    exp.sweep(["p"], [1], **TINY)
    with pytest.raises(TimeoutError, match="1 runs unfinished"):
        exp.wait(timeout=0.3, progress=False)
    store.delete("alice", exp.runs[0].job_id)
    with pytest.warns(UserWarning, match="resume"):
        assert exp.wait(timeout=1, progress=False)[MISSING] == 1


def test_result_cache_on_the_store(store):
    params = {"prompt": "cached", "seed": 5, "model": "tiny", **TINY}
    first = cached_enqueue(store, "alice", params)
    assert cached_enqueue(store, "alice", params).id == first.id  # queued: in flight, reused
    finish(store, "failed")
    second = cached_enqueue(store, "alice", params)
    assert second.id != first.id  # a failed job is never the answer
    assert cached_enqueue(store, "alice", {**params, "seed": 6}).id != second.id
    assert cached_enqueue(store, "bob", params).id != second.id  # per account
    assert cached_enqueue(store, "alice", params).id == second.id


def test_the_experiment_and_its_sweep_list_show_live_status_tables(store, sample_mp4):
    exp = open_exp(store, description="cats & <dogs>")
    jobs = exp.sweep(["a cat", "a dog"], [1], **TINY)
    assert isinstance(jobs, list) and [type(j).__name__ for j in jobs] == ["Job", "Job"]
    assert [j.id for j in jobs[:1]] == [jobs[0].id] and len(jobs) == 2  # still a plain list of Job
    before = exp._repr_html_()
    assert "0/2 finished" in before and before.count(">queued</span>") == 2
    assert "cats &amp; &lt;dogs&gt;" in before  # the description is text
    assert "0/2 finished" in jobs._repr_html_()
    finish(store, "done", video=sample_mp4)
    finish(store, "failed")
    # the same objects, displayed again: read now, not when they were made
    shown, listed = exp._repr_html_(), jobs._repr_html_()
    for html in (shown, listed):
        assert "2/2 finished" in html and ">done</span>" in html and ">failed</span>" in html
        assert "RuntimeError: boom" in html and "1.0 s" in html  # the failed run's error, the done one's run time
        assert html.index("a cat") < html.index("a dog")  # run order
    store.delete("alice", jobs[1].id)
    assert ">deleted</span>" in jobs._repr_html_() and ">missing</span>" in exp._repr_html_()


def test_a_running_run_shows_its_step_in_the_table(store):
    exp = open_exp(store)
    exp.sweep(["a cat"], [1, 2], **TINY)
    claim = store.claim("test-worker", 30.0)
    store.progress(claim.job.id, claim.token, stage="denoising", step=1, total=2)
    html = exp._repr_html_()
    # the job's bar as its other views draw it (progress_view): with no figures from a worker yet, the share
    # of steps done
    assert ">running</span>" in html and 'class="mochi-bar" value="0.500" max="1"' in html and "denoising 1/2" in html
    assert "0/2 finished" in html


def test_dataframe_puts_the_swept_params_seed_and_results_first_and_names_its_columns(store, sample_mp4):
    exp = open_exp(store)
    exp.sweep(["a cat", "a dog"], [7], num_frames=7, height=32, width=32, num_inference_steps=[2, 4], fps=8)
    finish(store, "done", video=sample_mp4)
    df = exp.to_dataframe()
    assert list(df.columns) == ["prompt", "num_inference_steps", "seed", "status", "run_s", "video", "error", "job_id"]
    assert list(df["num_inference_steps"]) == [2, 4, 2, 4] and df.loc[0, "run_s"] == 1.0
    every = exp.to_dataframe(all_columns=True)
    assert list(every.columns[:8]) == list(df.columns) and every["job_id"].tolist() == df["job_id"].tolist()
    assert {"run_key", "run_attempt", "job_stage", "denoise_s", "height", "worker_id"} <= set(every.columns[8:])
    assert "run" not in every.columns and "stage" not in every.columns  # each column says what it is
    picked = exp.to_dataframe(columns=["job_id", "height", "denoise_s"])
    assert list(picked.columns) == ["job_id", "height", "denoise_s"] and (picked["height"] == 32).all()
    with pytest.raises(ValueError, match="unknown columns 'steps'; the columns are prompt, num_inference_steps"):
        exp.to_dataframe(columns=["steps"])


def test_compare_has_row_and_column_headers_for_the_swept_params(store, sample_mp4, tmp_path):
    exp = open_exp(store)
    exp.sweep(["a cat", "a dog"], [1, 2], **TINY)
    finish(store, "done", video=sample_mp4)  # a cat, seed 1
    grid = exp.compare(download_dir=tmp_path / "videos")
    assert (grid.row_param, grid.col_param) == ("prompt", "seed")
    assert grid.row_labels == ["a cat", "a dog"] and grid.col_labels == ["1", "2"]
    done = grid.cell("a cat", "1")
    assert done["status"] == "done" and grid.videos[done["video"]] == sample_mp4.read_bytes()
    assert grid.cell("a dog", "2")["status"] == "queued" and grid.cell("a dog", "2")["video"] == -1
    assert len(grid.cells) == 4 and len(grid.videos) == 1 and grid.playing  # plays at once, together
    # the stand-in a notebook saved with the save hook keeps: the done run linked to its copy beside the
    # notebook (no thumbnail here: its link says the file), the others their status; the sync needs the kernel
    static = grid.static_html()
    copy = tmp_path / "videos" / f"{done['job_id']}.mp4"
    assert copy.read_bytes() == sample_mp4.read_bytes() and f"{copy.name}</a>" in static
    assert static.count(">queued</div>") == 3 and "playing them in sync needs the kernel" in static
    assert ">a cat</th>" in static and ">2</th>" in static
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME

    InteractiveShell.instance()  # displayed as in a kernel: the live grid, then its stand-in
    with capture_output() as shown:
        grid._ipython_display_()
    live, stand_in = shown.outputs[:2]
    assert WIDGET_MIME in live.data and live.metadata == {"mochi_lab": {"live_widget": True}}
    assert stand_in.data[STATIC_MIME] == static
    flipped = exp.compare(rows="seed", columns="prompt", download_dir=tmp_path / "videos")
    assert flipped.row_labels == ["1", "2"] and flipped.col_labels == ["a cat", "a dog"]
    assert flipped.cell("1", "a cat")["video"] == 0
    with pytest.raises(ValueError, match="not a generation parameter"):
        exp.compare(rows="colour", download_dir=tmp_path / "videos")
