"""The test gate (mochi_lab.worker.gate): a job held at a stage or step stays there, shows it, can be cancelled
there, and goes on when released. Every test that acts while a job runs relies on this."""

import time

import pytest

from mochi_lab.config import Settings
from mochi_lab.params import GenerationParams
from mochi_lab.store import open_store
from mochi_lab.worker.gate import write_hold
from mochi_lab.worker.loop import Worker
from tests.support.gate import Gate


@pytest.fixture()
def worker(tmp_path, tiny_checkpoint):
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tiny_checkpoint.parent, lease_s=4, poll_s=0.01,
                        test_gates=tmp_path / "gates")
    settings.test_gates.mkdir()
    w = Worker("w-gate", settings)
    w.start()
    yield w
    w.stop(timeout=60)


def _submit(worker, prompt, tiny, **extra):
    store = open_store(worker.settings.store_url)
    return store, store.enqueue("alice", GenerationParams.parse(prompt, **{**tiny, **extra}).to_dict()).id


def _wait(store, job_id, status, timeout=120):
    deadline = time.monotonic() + timeout
    while (record := store.get("alice", job_id)).status != status:
        assert time.monotonic() < deadline, f"job {job_id} is {record.status}, not {status}"
        time.sleep(0.01)
    return record


@pytest.mark.parametrize("stage, step", [("loading", None), ("denoising", 0), ("denoising", 1),
                                         ("decoding", None), ("encoding", None)])
def test_a_held_job_stays_at_its_gate_until_released(worker, tiny, stage, step):
    prompt = f"held at {stage} {step}"
    gate = Gate(prompt, stage, step, root=worker.settings.test_gates)
    # "loading" happens only for a model the worker has not loaded: a job of another model takes it there
    store, job_id = _submit(worker, prompt, tiny, **({"model": "tiny-broken"} if stage == "loading" else {}))
    assert gate.wait_reached() == [job_id]
    seen = store.get("alice", job_id)
    assert (seen.status, seen.stage) == ("running", stage)
    if step is not None:
        assert seen.step == step
    time.sleep(0.2)  # held, not merely slow: nothing moves while the gate is shut
    later = store.get("alice", job_id)
    assert (later.status, later.stage, later.step) == ("running", seen.stage, seen.step)
    gate.release()
    _wait(store, job_id, "failed" if stage == "loading" else "done")


def test_a_job_held_at_a_step_is_cancelled_there(worker, tiny):
    gate = Gate("held, then cancelled", "denoising", 1, root=worker.settings.test_gates)
    store, job_id = _submit(worker, "held, then cancelled", tiny)
    gate.wait_reached()
    store.cancel("alice", job_id)
    record = _wait(store, job_id, "cancelled")
    assert record.step == 1
    assert gate.reached() == [job_id]  # the worker went on without the gate's release


def test_a_new_hold_moves_a_held_job_on_to_its_step(worker, tiny):
    gate = Gate("held twice", "denoising", 1, root=worker.settings.test_gates)
    store, job_id = _submit(worker, "held twice", tiny, num_inference_steps=4)
    gate.wait_reached()
    later = Gate("held twice", "denoising", 3, root=worker.settings.test_gates)
    assert later.wait_reached() == [job_id]
    assert (store.get("alice", job_id).status, store.get("alice", job_id).step) == ("running", 3)
    later.release()
    _wait(store, job_id, "done")


def test_other_prompts_pass_and_a_bad_stage_is_refused(worker, tiny):
    Gate("only this prompt", "denoising", 1, root=worker.settings.test_gates)
    store, job_id = _submit(worker, "another prompt", tiny)
    _wait(store, job_id, "done")
    with pytest.raises(ValueError, match="stage must be one of loading, denoising, decoding, encoding"):
        write_hold(worker.settings.test_gates, "x", "queued")
