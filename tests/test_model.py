"""model.py: a job's record as a table row; when a pool's workers are ready, by their rows (the pool with its
actors' processes, a client without)."""

import pytest

from mochi_lab.model import PARAM_COLUMNS, TIMINGS, JobRecord, job_row, wait_workers_ready, workers_ready


def row(worker_id: str, state: str, pid: int, error: str | None = None) -> dict:
    return {"worker_id": worker_id, "state": state, "pid": pid, "error": error}


def test_rows_only_every_row_idle_or_busy_and_at_least_one():
    assert not workers_ready([])
    assert workers_ready([row("w0", "idle", 1), row("w1", "busy", 2)])
    assert not workers_ready([row("w0", "idle", 1), row("w1", "loading", 2)])


def test_with_the_processes_a_killed_processs_row_does_not_count():
    # w1's actor was restarted (pid 20 -> 21); its killed process's row still says busy until its TTL
    rows = [row("w0", "idle", 10), row("w1", "busy", 20)]
    assert workers_ready(rows)  # what rows alone say
    assert not workers_ready(rows, {"w0": 10, "w1": 21})
    assert not workers_ready(rows, {"w0": 10, "w1": None})  # restarting: its process does not answer yet
    assert not workers_ready([row("w0", "idle", 10), row("w1", "loading", 21)], {"w0": 10, "w1": 21})
    assert workers_ready([row("w0", "idle", 10), row("w1", "idle", 21)], {"w0": 10, "w1": 21})
    assert not workers_ready([row("w0", "idle", 10)], {"w0": 10, "w1": 21})  # w1 has written no row yet
    assert not workers_ready(rows, {})  # no actors: nothing is ready


def test_a_failed_load_raises_unless_a_killed_process_said_it():
    failed = [row("w0", "idle", 10), row("w1", "error", 20, "out of memory")]
    with pytest.raises(RuntimeError, match="worker w1 failed to load: out of memory"):
        workers_ready(failed)
    with pytest.raises(RuntimeError, match="worker w1 failed to load"):
        workers_ready(failed, {"w0": 10, "w1": 20})
    assert not workers_ready(failed, {"w0": 10, "w1": 21})  # the new process loads afresh


def test_wait_reads_anew_until_ready_or_the_deadline():
    reads = iter([[row("w0", "loading", 1)], [row("w0", "loading", 1)], [row("w0", "idle", 1)]])
    wait_workers_ready(lambda: next(reads), 5, every=0)
    with pytest.raises(TimeoutError, match="workers not ready after 0s"):
        wait_workers_ready(lambda: [row("w0", "loading", 1)], 0)


def test_a_job_row_has_the_same_flat_columns_for_every_job():
    done = JobRecord("1-aaaaaaaaaaaa", "alice", {"prompt": "a fox", "seed": 7, "width": 64}, status="done", tags=["t"],
                     timings={"run_s": 1.5}, artifacts={"video": "/a/1.mp4"}, created_at=1.7e9)
    row = job_row(done)
    assert list(row) == list(job_row(JobRecord("2-bbbbbbbbbbbb", "bob", {})))
    assert set(PARAM_COLUMNS) | set(TIMINGS) <= set(row)
    assert not any(isinstance(v, dict) for v in row.values())
    assert (row["id"], row["status"], row["prompt"], row["seed"], row["height"]) == (done.id, "done", "a fox", 7, None)
    assert (row["run_s"], row["denoise_s"], row["video"], row["thumbnail"], row["tags"]) == (1.5, None, "/a/1.mp4",
                                                                                             None, ["t"])


def test_a_job_row_reads_parts_that_are_not_mappings_as_empty():
    odd = JobRecord("3-cccccccccccc", "eve", params="a string", timings=[1, 2], artifacts=None)  # type: ignore[arg-type]
    row = job_row(odd)
    assert row["prompt"] is None and row["run_s"] is None and row["video"] is None
