"""model.py: when a pool's workers are ready, by their rows (the pool with its actors' processes, a client without)."""

import pytest

from mochi_lab.model import wait_workers_ready, workers_ready


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
