"""The worker loop in a plain process (it knows nothing of Ray): memory stays flat, logs carry job ids."""

import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from mochi_lab.config import Settings
from mochi_lab.logs import JsonFormatter
from mochi_lab.params import GenerationParams
from mochi_lab.store import open_store
from mochi_lab.worker.loop import Worker
from tests.support.jobkit import strip_pictures

MiB = 2**20


def test_rss_stays_flat_over_20_jobs_and_logs_are_structured(tmp_path, tiny_checkpoint, tiny):
    settings = Settings(data_dir=tmp_path, cache_dir=tiny_checkpoint.parent, lease_s=30, poll_s=0.01)
    store = open_store(settings.store_url)
    ids = [store.enqueue("alice", GenerationParams.parse("a cat", seed=i, **tiny).to_dict()).id for i in range(20)]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("mochi_lab.worker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    worker = Worker("w-local", settings)
    worker.start()
    try:
        deadline = time.monotonic() + 300
        while store.counts("alice")["done"] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        worker.stop(timeout=60)
        logger.removeHandler(handler)
    records = [store.get("alice", i) for i in ids]
    assert [r.status for r in records] == ["done"] * 20
    rss = [r.meta["rss_after"] for r in sorted(records, key=lambda r: r.finished_at)]
    # after a few warm-up jobs (allocator pools, lazy imports) memory must not creep
    assert max(rss[5:]) - rss[4] < 16 * MiB, [round(x / MiB, 1) for x in rss]
    first, *rest = sorted(records, key=lambda r: r.started_at)
    assert first.timings["load_s"] > 0  # it was queued before the model was loaded
    assert all(r.timings["load_s"] == 0 for r in rest)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    done = [line for line in lines if line["msg"].startswith("done")]
    assert {line["job_id"] for line in done} == set(ids)
    assert all(line["worker_id"] == "w-local" and line["level"] == "INFO" for line in done)


def test_worker_validates_stored_params_and_prompt_tokens_at_the_claim(tmp_path, tiny_checkpoint, tiny):
    """The store is a trust boundary: bad params and over-long prompts fail at once, without a retry."""
    import importlib.metadata

    import mochi_lab

    settings = Settings(data_dir=tmp_path, cache_dir=tiny_checkpoint.parent, lease_s=30, poll_s=0.01)
    store = open_store(settings.store_url)
    bad = store.enqueue("alice", {**GenerationParams.parse("a cat", seed=1, **tiny).to_dict(), "num_frames": 8})
    long_prompt = "a " * 300  # 600 characters, ~300 T5 tokens
    too_long = store.enqueue("alice", {**GenerationParams.parse("a cat", seed=1, **tiny).to_dict(), "prompt": long_prompt})
    good = store.enqueue("alice", GenerationParams.parse("a cat", seed=1, **tiny).to_dict())
    worker = Worker("w-admit", settings)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while store.get("alice", good.id).status not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop(timeout=60)
    got = store.get("alice", bad.id)
    assert (got.status, got.attempts) == ("failed", 1)
    assert "num_frames" in got.error and "6k+1" in got.error and got.step == 0
    got = store.get("alice", too_long.id)
    assert (got.status, got.attempts, got.step) == ("failed", 1, 0)
    n = worker.runner.count_tokens(long_prompt)
    assert got.error.endswith(f"prompt: is {n} tokens for model 'tiny'; the limit is 256 "
                              "(the text encoder's max_sequence_length)")
    done = store.get("alice", good.id)
    assert done.status == "done"
    assert done.meta["versions"]["mochi_lab"] == importlib.metadata.version("mochi_lab") == mochi_lab.__version__


def test_worker_modules_do_not_import_the_package_face():
    import ast
    from pathlib import Path

    import mochi_lab.worker.loop as worker_mod

    for path in Path(worker_mod.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mochi_lab":
                raise AssertionError(f"{path.name} imports the package face: line {node.lineno}")


def test_previews_and_honest_eta_while_a_job_runs(tmp_path, tiny_checkpoint, hold):
    """Previews every 4 steps reach the store (the last one stays with a cancelled job, goes with a done one);
    the ETA comes from the job's measured steps and falls as it runs."""
    import io

    from PIL import Image

    settings = Settings(data_dir=tmp_path, cache_dir=tiny_checkpoint.parent, lease_s=30, poll_s=0.01,
                        preview_every=4, preview_min_interval_s=0,
                        test_gates=Path(os.environ["MOCHI_LAB_TEST_GATES"]))  # the `hold` fixture's gates
    store = open_store(settings.store_url)
    size = {"num_frames": 19, "height": 64, "width": 96, "fps": 8}
    # denoising dominates (as with the real model), and the warm-up job teaches the worker its decode + encode
    warm = store.enqueue("alice", GenerationParams.parse("warm-up", seed=1, num_inference_steps=4, **size).to_dict())
    job = store.enqueue("alice", GenerationParams.parse("a cat", seed=2, num_inference_steps=120, **size).to_dict())
    worker = Worker("w-preview", settings)
    worker.start()
    try:
        deadline = time.monotonic() + 300
        while store.get("alice", job.id).status != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        done = store.get("alice", job.id)
        # cancelled mid-run: it keeps its last preview (step 4's, stored before the step's progress)
        gate = hold("a dog, cancelled after its first preview", step=4)
        slow = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=3, num_inference_steps=200,
                                                             **size).to_dict())
        gate.wait_reached()
        store.cancel("alice", slow.id)
        while store.get("alice", slow.id).status != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop(timeout=60)
    assert store.get("alice", warm.id).status == "done" and done.status == "done"
    log = store.progress_since("alice", job.id)
    denoising = [e for e in log if e["stage"] in ("denoising", "decoding")]
    assert sorted({e["live"].get("preview_step") for e in denoising} - {None}) == list(range(4, 121, 4))
    assert store.get_preview("alice", job.id) is None  # the video replaced it
    step, image = store.get_preview("alice", slow.id)
    strip = Image.open(io.BytesIO(image))
    assert 0 < step < 200 and strip.format == "WEBP" and strip.size == (12, 8) and strip_pictures(strip) == 4

    # ETA: from the second step on, made of the job's own measured steps (the steps left at the pace of the
    # later half of those done) and the decode + encode the warm-up job took. How close it comes to what was
    # left, and whether it falls, depends on the machine keeping its pace: a clock of the test's own, below.
    steps = [e for e in denoising if e["stage"] == "denoising"]
    elapsed = {e["step"]: e["live"]["elapsed_s"] for e in steps}
    etas = [(e["step"], e["live"]["eta_s"], e["live"]["rate"]) for e in steps if "eta_s" in e["live"]]
    assert etas[0][0] == 2 and all(rate > 0 for _, _, rate in etas)
    warm_timings = store.get("alice", warm.id).timings
    post_s = warm_timings.get("decode_s", 0.0) + warm_timings["encode_s"]  # the same size: the same pixels
    for step, eta, rate in etas:
        half = max(1, step // 2)
        # to the millisecond the log keeps
        assert (step - half) / rate == pytest.approx(elapsed[step] - elapsed[half], rel=1e-3, abs=1.5e-3), step
        assert eta == pytest.approx((120 - step) / rate + post_s, rel=1e-3, abs=1e-3), step
    decoding = [e for e in denoising if e["stage"] == "decoding"]
    assert [e["live"]["eta_s"] for e in decoding] == [pytest.approx(post_s, abs=1e-3)]


class _SteadyClock:
    """time for mochi_lab.worker.clock, whose monotonic() is the test's own in the test's thread (other threads
    of this process, the session pool's workers, keep the real one)."""

    def __init__(self) -> None:
        self.now, self._thread = 1000.0, threading.get_ident()

    def monotonic(self) -> float:
        return self.now if threading.get_ident() == self._thread else time.monotonic()

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_the_eta_at_a_steady_pace_is_what_is_left_falls_and_follows_a_change_of_pace(monkeypatch):
    from mochi_lab.worker import clock as clock_mod

    clock = _SteadyClock()
    monkeypatch.setattr(clock_mod, "time", clock)
    params = GenerationParams.parse("a cat", seed=1, num_frames=7, height=32, width=32, num_inference_steps=60)
    post_s = 2.0  # this worker's decode + encode of a job this size
    job = clock_mod.JobClock(params, post_s / (7 * 32 * 32), clock.now)
    clock.now += 1.5  # loading, text encoding
    job.live(0)
    etas = {}
    for step in range(1, 61):
        clock.now += 0.1 if step <= 20 else 0.25  # the machine slows down after step 20
        etas[step] = job.live(step).get("eta_s")
    left = {step: (60 - step) * (0.1 if step <= 20 else 0.25) + post_s for step in range(1, 60)}
    assert etas[1] is None  # one step says nothing of the pace (it carries the warm-up)
    assert all(etas[s] == pytest.approx(left[s], abs=1e-3) for s in range(2, 21)), etas
    assert all(etas[s] > etas[s + 1] for s in range(2, 20))
    # the pace of the later half of the steps done: from step 40 on, the new pace alone
    assert all(etas[s] == pytest.approx(left[s], abs=1e-3) for s in range(40, 60)), etas
    assert etas[60] == pytest.approx(post_s, abs=1e-3)  # denoised: decode and encode are left
