"""Prometheus metrics: the endpoint scraped over HTTP and parsed with prometheus_client's own parser. The
figures come from the store (jobs, and the rows every worker publishes), so the fast tier's pool of Worker
threads serves them as Ray's actors do."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mochi_lab.pool.metrics import GPU_FIELDS, Metrics
from mochi_lab.store import open_store
from tests.support.faults_helpers import wait_for

STEPS = 6


def scrape(port: int) -> dict[str, list]:
    """name -> samples (prometheus_client Sample tuples), from one GET /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture()
def endpoint(mochi):
    metrics = Metrics(mochi.backend.store)
    port = metrics.serve(0)
    yield port
    metrics.close()


def test_counts_and_histogram_sums_match_the_jobs_own_timings(mochi, endpoint, tiny):
    # the pool is shared by the session: no other test's job may end inside this one's before/after
    wait_for(lambda: (c := mochi.counts())["queued"] + c["running"] == 0
             and all(w["state"] == "idle" for w in mochi.workers()), 120, "the session's pool idle")
    workers = len(mochi.workers())
    before = scrape(endpoint)
    seed = time.time_ns() % 2**31
    jobs = [mochi.generate("metrics", seed=seed + i, **{**tiny, "num_inference_steps": STEPS}) for i in range(3)]
    records = [job.wait(timeout=300) for job in jobs]
    assert [r.status for r in records] == ["done"] * 3
    # a worker publishes its figures just after the store records the job: wait for the rows to follow
    deadline = time.monotonic() + 20
    while True:
        after = scrape(endpoint)
        done = total(after, "mochi_jobs_finished_total", outcome="done") - total(before, "mochi_jobs_finished_total",
                                                                                  outcome="done")
        if done >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done == 3
    assert total(after, "mochi_denoise_steps_total") - total(before, "mochi_denoise_steps_total") == 3 * STEPS
    for stage in ("queue", "load", "denoise", "decode", "encode"):
        want = sum(r.timings[f"{stage}_s"] for r in records)
        got = (total(after, "mochi_stage_seconds_sum", stage=stage)
               - total(before, "mochi_stage_seconds_sum", stage=stage))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), stage
        count = (total(after, "mochi_stage_seconds_count", stage=stage)
                 - total(before, "mochi_stage_seconds_count", stage=stage))
        assert count == 3, stage
        # cumulative buckets: each holds the jobs at or under its bound, +Inf all of them
        for sample in after["mochi_stage_seconds_bucket"]:
            if sample.labels["stage"] != stage:
                continue
            worker, le = sample.labels["worker"], sample.labels["le"]
            bound = float("inf") if le == "+Inf" else float(le)
            grown = sample.value - total(before, "mochi_stage_seconds_bucket", stage=stage, le=le, worker=worker)
            assert grown == sum(1 for r in records if r.worker_id == worker and r.timings[f"{stage}_s"] <= bound), \
                (stage, worker, le)
    rates = after["mochi_steps_per_second"]
    assert rates and all(s.value > 0 for s in rates)
    assert total(after, "mochi_workers", state="idle") + total(after, "mochi_workers", state="busy") == workers
    assert total(after, "mochi_store_up") == 1
    # on this CPU there is no GPU: its metrics exist but carry no samples, rather than zeros
    for name, _ in GPU_FIELDS.values():
        assert name not in after


def test_queue_depth_by_model_and_state_without_ids_prompts_or_accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    for i in range(3):
        store.enqueue("alice", {"prompt": "a secret prompt", "model": "tiny", "seed": i})
    job = store.enqueue("bob", {"prompt": "another secret", "model": "mochi-1-preview"})
    store.claim("w", 60)
    metrics = Metrics(store)
    port = metrics.serve(0)
    try:
        samples = scrape(port)
        text = metrics.render().decode()
    finally:
        metrics.close()
    queue = {(s.labels["model"], s.labels["state"]): s.value for s in samples["mochi_queue_jobs"]}
    assert queue == {("tiny", "queued"): 2, ("tiny", "running"): 1, ("mochi-1-preview", "queued"): 1}
    assert all(set(s.labels) == {"model", "state"} for s in samples["mochi_queue_jobs"])
    for secret in ("secret", job.id, "alice", "bob"):
        assert secret not in text
    with_accounts = Metrics(store, accounts=True).render().decode()
    assert 'account="alice"' in with_accounts and 'account="bob"' in with_accounts
    store.close()


def test_a_store_that_does_not_answer_is_counted_and_reported_down():
    store = open_store("redis://127.0.0.1:1/0")  # nothing listens on port 1
    metrics = Metrics(store)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    families2 = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["mochi_store_up"].samples[0].value == 0
    assert "mochi_queue_jobs" not in families
    owner = [s.value for s in families2["mochi_store_errors"].samples if s.labels["component"] == "owner"]
    assert owner == [2]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA GPU here: NVML figures are left out, tested above")
def test_nvml_reads_this_processs_gpu():
    from mochi_lab.worker.telemetry import NvmlSampler

    sample = NvmlSampler().sample()
    assert 0.0 <= sample["gpu_utilization"] <= 1.0
    assert 0 < sample["gpu_device_memory_used"] <= sample["gpu_device_memory_total"]
    assert sample.get("gpu_power_w", 1.0) > 0


def test_worker_rows_on_cpu_carry_no_gpu_figures(mochi):
    from mochi_lab.worker.telemetry import NvmlSampler

    if _has_cuda():
        pytest.skip("this machine has a GPU")
    assert NvmlSampler().sample() == {}
    rows = list(mochi.workers())
    assert rows and not any(field in row for row in rows for field in GPU_FIELDS)
