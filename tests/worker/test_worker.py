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
    # After a few warm-up jobs (allocator pools, lazy imports) memory must not creep. The figure is the whole
    # test process's RSS, where the session's other threads (its pool, its gateway) allocate and free buffers
    # at moments of their own: one sample may catch one. What a job retains raises the floor, so the floors of
    # two windows ten jobs apart are compared (a leak of 1.6 MiB a job fails).
    assert min(rss[15:]) - min(rss[5:10]) < 16 * MiB, [round(x / MiB, 1) for x in rss]
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
    # later half of those done) and the decode + encode the warm-up job took; before it, the warm-up's pace per
    # step. How close it comes to what was left, and whether it falls, depends on the machine keeping its
    # pace: a clock of the test's own, below.
    steps = [e for e in denoising if e["stage"] == "denoising"]
    elapsed = {e["step"]: e["live"]["elapsed_s"] for e in steps}
    etas = [(e["step"], e["live"]["eta_s"], e["live"]["rate"]) for e in steps if "rate" in e["live"]]
    assert etas[0][0] == 2 and all(rate > 0 for _, _, rate in etas)
    warm_timings = store.get("alice", warm.id).timings
    post_s = warm_timings.get("decode_s", 0.0) + warm_timings["encode_s"]  # the same size: the same pixels
    first = next(e for e in steps if e["step"] == 1)["live"]
    assert first["eta_s"] == pytest.approx(119 * warm_timings["denoise_s"] / 4 + post_s, rel=1e-3, abs=1e-3)
    for step, eta, rate in etas:
        half = max(1, step // 2)
        # to the millisecond the log keeps
        assert (step - half) / rate == pytest.approx(elapsed[step] - elapsed[half], rel=1e-3, abs=1.5e-3), step
        assert eta == pytest.approx((120 - step) / rate + post_s, rel=1e-3, abs=1e-3), step
    decoding = [e for e in denoising if e["stage"] == "decoding"]
    # the decode and the encode left, as the warm-up took them; then counting down while they run
    assert decoding[0]["live"]["eta_s"] == pytest.approx(post_s, abs=1e-3)
    assert all(a["live"]["eta_s"] >= b["live"]["eta_s"] for a, b in zip(decoding, decoding[1:]))
    # the share of the whole job done: every write has it (the worker knows every stage's pace), and it rises
    fractions = [e["live"]["fraction"] for e in log]
    assert all(0 < f < 1 for f in fractions) and fractions == sorted(fractions)


def test_progress_goes_on_through_decode_and_encode_and_a_cancel_there_stops_the_job(tmp_path, tiny_checkpoint,
                                                                                     hold, tiny):
    """Held at the decoding gate, then at the encoding one, the worker writes the job's progress again every
    TICK_S: the ETA falls, the elapsed time and the whole job's fraction rise. A cancel seen while decoding
    or encoding stops the job there (no MP4 is written for it), and no tick outlives its job."""
    from mochi_lab.worker.job import TICK_S
    from tests.support.faults_helpers import wait_for

    settings = Settings(data_dir=tmp_path, cache_dir=tiny_checkpoint.parent, lease_s=30, poll_s=0.01,
                        test_gates=Path(os.environ["MOCHI_LAB_TEST_GATES"]))  # the `hold` fixture's gates
    store = open_store(settings.store_url)
    worker = Worker("w-ticks", settings)
    # this worker's history, as if its past jobs of this size had decoded and encoded for a minute each (a held
    # stage outlasting its pace would count down to 0 at once: see the steady clock's test below)
    worker._pace.learn(GenerationParams.parse("any", **tiny), {"text_s": 0.1, "denoise_s": 0.2, "decode_s": 60.0,
                                                                "encode_s": 60.0})
    worker.start()

    def ticks_at(job_id: str, stage: str, n: int) -> list[dict]:
        entries = [e for e in store.progress_since("alice", job_id) if e["stage"] == stage]
        return entries if len(entries) >= n else []

    try:
        gate = hold("decoded, then encoded, ticking", "decoding", step=None)
        job = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=2, **tiny).to_dict())
        gate.wait_reached()
        decoding = wait_for(lambda: ticks_at(job.id, "decoding", 3), 60, "ticks while decoding")
        moved = hold(gate.prompt, "encoding", step=None)  # the job goes on, and is held again at the encode
        moved.wait_reached()
        encoding = wait_for(lambda: ticks_at(job.id, "encoding", 3), 60, "ticks while encoding")
        moved.release()
        wait_for(lambda: store.get("alice", job.id).finished, 60, "the job's end")
        done = store.get("alice", job.id)

        stopped = {}
        for stage in ("decoding", "encoding"):
            gate = hold(f"cancelled while {stage}", stage, step=None)
            victim = store.enqueue("alice", GenerationParams.parse(gate.prompt, seed=3, **tiny).to_dict())
            gate.wait_reached()
            wait_for(lambda: ticks_at(victim.id, stage, 2), 60, f"ticks while {stage}")
            store.cancel("alice", victim.id)
            wait_for(lambda: store.get("alice", victim.id).finished, 60, "the cancelled job's end")
            stopped[stage] = store.get("alice", victim.id)
        wait_for(lambda: not any(t.name.startswith("mochi-ticker-") for t in threading.enumerate()), 30,
                 "the tickers' end")
    finally:
        worker.stop(timeout=60)
    assert done.status == "done" and done.stage == "done"
    for entries in (decoding, encoding):
        lives = [e["live"] for e in entries]
        assert all(e["status"] == "running" and e["step"] == e["total_steps"] == tiny["num_inference_steps"]
                   for e in entries)
        elapsed = [live["elapsed_s"] for live in lives]
        assert all(b - a >= TICK_S * 0.9 for a, b in zip(elapsed[1:], elapsed[2:])), elapsed  # a tick each TICK_S
        etas = [live["eta_s"] for live in lives]
        assert etas == sorted(etas, reverse=True) and etas[0] > 0, etas  # counting down (to 0 past the pace)
        fractions = [live["fraction"] for live in lives]
        assert all(a < b for a, b in zip(fractions, fractions[1:])) and fractions[-1] < 1, fractions
    assert decoding[-1]["live"]["fraction"] < encoding[0]["live"]["fraction"]
    for stage, r in stopped.items():
        assert (r.status, r.artifacts) == ("cancelled", {}), stage
        assert not any(p.name.startswith(r.id) for p in tmp_path.rglob("*.mp4")), stage


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
    pace = clock_mod.Pace()
    pace.learn(params, {"decode_s": 1.5, "encode_s": 0.5})  # this worker's decode + encode of a job this size
    post_s = 2.0
    job = clock_mod.JobClock(params, pace, clock.now, waited_s=3.0)
    clock.now += 1.5  # loading, text encoding
    job.live("denoising", 0)
    etas, fractions = {}, {}
    for step in range(1, 61):
        clock.now += 0.1 if step <= 20 else 0.25  # the machine slows down after step 20
        live = job.live("decoding" if step == 60 else "denoising", step)
        etas[step], fractions[step] = live.get("eta_s"), live.get("fraction")
    left = {step: (60 - step) * (0.1 if step <= 20 else 0.25) + post_s for step in range(1, 60)}
    assert etas[1] is None  # one step says nothing of the pace (it carries the warm-up), nor has any past job
    assert all(etas[s] == pytest.approx(left[s], abs=1e-3) for s in range(2, 21)), etas
    assert all(etas[s] > etas[s + 1] for s in range(2, 20))
    # the pace of the later half of the steps done: from step 40 on, the new pace alone
    assert all(etas[s] == pytest.approx(left[s], abs=1e-3) for s in range(40, 60)), etas
    assert etas[60] == pytest.approx(post_s, abs=1e-3)  # denoised: decode and encode are left
    # the share of the whole job: the time it has taken (3 s queued, then this attempt) over that plus what is left
    taken = 3.0 + 1.5 + 20 * 0.1 + 20 * 0.25
    assert fractions[40] == pytest.approx(taken / (taken + left[40]), abs=1e-4)
    assert all(fractions[s] <= fractions[s + 1] for s in range(2, 60)) and fractions[60] < 1


def test_decode_and_encode_count_down_and_the_fraction_moves_through_them(monkeypatch):
    """Between the writes at a stage's start, the ticker's `now()` counts the ETA down by the time that went
    by and moves the fraction on; a stage that overruns its pace waits at what follows it, never below 0."""
    from mochi_lab.worker import clock as clock_mod

    clock = _SteadyClock()
    monkeypatch.setattr(clock_mod, "time", clock)
    params = GenerationParams.parse("a cat", seed=1, num_frames=7, height=32, width=32, num_inference_steps=4)
    pace = clock_mod.Pace()
    pace.learn(params, {"text_s": 0.2, "denoise_s": 0.4, "decode_s": 3.0, "encode_s": 1.0})
    job = clock_mod.JobClock(params, pace, clock.now, waited_s=0.0)
    first = job.live("denoising", 0)
    assert first["eta_s"] == pytest.approx(0.2 + 0.4 + 3.0 + 1.0)  # known from the pace before any step
    assert job.live("loading").get("eta_s") is None and "fraction" not in job.now()  # a load: no pace to go by
    job.live("denoising", 0)
    for step in range(1, 5):
        clock.now += 0.1
        live = job.live("decoding" if step == 4 else "denoising", step)
    assert live["eta_s"] == pytest.approx(4.0)
    seen = [live]
    for _ in range(5):  # the decode: 3 s at this pace, one long call
        clock.now += 0.5
        seen.append(job.now())
    assert [s["eta_s"] for s in seen] == pytest.approx([4.0, 3.5, 3.0, 2.5, 2.0, 1.5])
    assert [s["elapsed_s"] for s in seen] == pytest.approx([0.4 + 0.5 * i for i in range(6)])
    assert all(a["fraction"] < b["fraction"] for a, b in zip(seen, seen[1:]))
    clock.now += 2.0  # the decode overruns: the encode is what is left
    assert job.now()["eta_s"] == pytest.approx(1.0)
    enc = job.live("encoding")
    assert enc["eta_s"] == pytest.approx(1.0)
    clock.now += 0.75
    later = job.now()
    assert later["eta_s"] == pytest.approx(0.25) and later["fraction"] > enc["fraction"]
    clock.now += 5
    assert job.now()["eta_s"] == 0 and job.now()["fraction"] < 1  # only the job's end says it is finished
    # a new model's job: nothing to go by for it
    other = GenerationParams.parse("a cat", seed=1, num_frames=7, height=32, width=32, num_inference_steps=4,
                                   model="tiny-broken")
    fresh = clock_mod.JobClock(other, pace, clock.now)
    assert fresh.live("denoising", 0) == {"elapsed_s": 0.0}
