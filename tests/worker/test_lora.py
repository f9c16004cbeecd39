"""LoRA adapters on a warm worker: the real Worker loop in this process over a SQLite store, the tiny model,
adapters made with peft (random, non-zero). An adapter changes the frames; a job without one after jobs with
one gives the base frames bit for bit; each job's frames are a fresh worker's running it alone; the base model is
never reloaded, and the least recently used adapter goes when the cache is full."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest

from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import Settings
from mochi_lab.model import FINISHED, JobRecord
from mochi_lab.params import GenerationParams, SubmitOptions
from mochi_lab.store import open_store
from mochi_lab.worker.loop import Worker
from tests.support.lora import make_adapter


@pytest.fixture()
def direct(tmp_path, tiny_checkpoint):
    """A backend over a store of its own (no pool), its adapters A and B, and its settings (a cache of 1)."""
    settings = Settings(data_dir=tmp_path, cache_dir=tiny_checkpoint.parent, lease_s=30, poll_s=0.01,
                        account="alice", lora_cache=1)
    backend = DirectBackend(settings, open_store(settings.store_url), None)
    for name, seed in (("A", 1), ("B", 2)):
        with make_adapter(tmp_path / "made" / f"{name}.safetensors", seed=seed).open("rb") as f:
            backend.put_adapter(name, f)
    yield backend
    backend.close()


def _submit(backend: DirectBackend, lora=None) -> str:
    params = GenerationParams.parse("a cat surfing a wave", seed=5, num_frames=7, height=32, width=32,
                                    num_inference_steps=3, fps=8, lora=lora)
    return backend.submit(params, SubmitOptions.parse(), reuse=False).id


def _run(backend: DirectBackend, ids: list[str], timeout: float = 300) -> tuple[list[JobRecord], Worker]:
    """A fresh worker runs the queued jobs `ids` (queued in this order: it takes them so), then stops."""
    worker = Worker(f"w-{uuid.uuid4().hex[:6]}", backend.settings)
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        while not all(backend.get(i).status in FINISHED for i in ids):
            assert time.monotonic() < deadline, [backend.get(i).status for i in ids]
            time.sleep(0.05)
    finally:
        worker.stop(timeout=60)
    return [backend.get(i) for i in ids], worker


def _video(record: JobRecord) -> str:
    assert record.status == "done", (record.status, record.error)
    return hashlib.sha256(Path(record.artifacts["video"]).read_bytes()).hexdigest()


def test_base_and_adapters_on_one_warm_worker_each_give_a_fresh_workers_frames(direct):
    order = [None, "A", "A", None, [("B", 0.7)], "A", [("A", 0.0)]]
    ids = [_submit(direct, lora) for lora in order]
    records, warm = _run(direct, ids)
    base, a1, a2, base_after, b, a3, a_zero = records
    (alone_a,), _ = _run(direct, [_submit(direct, "A")])
    (alone_b,), _ = _run(direct, [_submit(direct, [("B", 0.7)])])

    assert _video(base) != _video(a1) and _video(a1) != _video(b) and _video(b) != _video(base)
    assert _video(base_after) == _video(base)  # after A was loaded, applied and disabled: bit for bit
    assert _video(a_zero) == _video(base)  # a scale of 0 is the base model
    assert _video(a1) == _video(a2) == _video(a3) == _video(alone_a)
    assert _video(b) == _video(alone_b)  # B, with A loaded beside it (then evicted), as B alone
    # one model load for all seven jobs; A loaded, kept, evicted by B (a cache of 1), loaded again
    assert warm.jobs_done == 7 and base.timings["load_s"] > 0
    assert all(r.timings["load_s"] == 0 for r in records[1:])
    assert a1.meta["lora_load_s"] > 0 and a2.meta["lora_load_s"] == 0 and a3.meta["lora_load_s"] > 0
    sha_a, sha_b = (direct.adapter_store().get(n)["sha256"] for n in ("A", "B"))
    assert list(warm.runner.lora.loaded) == [sha_a]
    assert b.meta["lora"] == [{"name": "B", "sha256": sha_b, "scale": 0.7, "load_s": b.meta["lora_load_s"]}]
    assert b.params["lora"] == [{"name": "B", "scale": 0.7, "sha256": sha_b}]  # the result cache's key has it
    assert a_zero.meta["lora"][0]["load_s"] == 0 and "lora" not in base.meta and "lora" not in base.params


def test_an_adapter_gone_or_changed_after_the_job_was_queued_fails_it_and_the_worker_serves_on(direct):
    gone, changed = _submit(direct, "A"), _submit(direct, "B")
    store = direct.adapter_store()
    path_a = store.dir / f"{store.get('A')['sha256']}.safetensors"
    path_b = store.dir / f"{store.get('B')['sha256']}.safetensors"
    path_a.unlink()
    path_b.write_bytes(path_b.read_bytes()[:-4] + b"\x00\x00\x80\x7f")  # one weight made inf: a tampered file
    after = _submit(direct)
    (gone, changed, after), _ = _run(direct, [gone, changed, after])
    assert (gone.status, changed.status, after.status) == ("failed", "failed", "done")
    assert gone.error.startswith("lora: adapter 'A' (sha256 ") and "is gone" in gone.error
    assert changed.error == ("lora: adapter 'B' refused: the file's sha256 is not "
                             f"{store.get('B')['sha256']}: it changed after it was checked")
    assert gone.attempts == changed.attempts == 1  # not retried: the same job would fail the same way


def test_a_job_queued_before_its_adapter_was_replaced_or_deleted_runs_with_the_file_it_was_queued_with(direct,
                                                                                                        tmp_path):
    """The old files stay while a queued job names them; the first upload or delete after those jobs end removes
    them. The jobs' videos are those of the files they were queued with."""
    store = direct.adapter_store()
    old_a, old_b = store.get("A")["sha256"], store.get("B")["sha256"]
    with_a, with_b = _submit(direct, "A"), _submit(direct, "B")
    with make_adapter(tmp_path / "made" / "A2.safetensors", seed=3).open("rb") as f:
        new_a = direct.put_adapter("A", f)["sha256"]  # A replaced
    direct.delete_adapter("B")
    assert new_a != old_a and [r["name"] for r in store.list()] == ["A"]
    assert store.dir.joinpath(f"{old_a}.safetensors").is_file() and store.dir.joinpath(f"{old_b}.safetensors").is_file()
    with_new_a = _submit(direct, "A")
    (ran_a, ran_b, ran_new_a), _ = _run(direct, [with_a, with_b, with_new_a])
    assert [r.meta["lora"][0]["sha256"] for r in (ran_a, ran_b, ran_new_a)] == [old_a, old_b, new_a]
    assert _video(ran_a) != _video(ran_new_a) and ran_b.status == "done"
    assert store.dir.joinpath(f"{old_a}.safetensors").is_file()  # nothing removes a file between uploads
    with make_adapter(tmp_path / "made" / "C.safetensors", seed=4).open("rb") as f:
        direct.put_adapter("C", f)  # the jobs have ended: this upload removes the old files
    assert sorted(p.stem for p in store.dir.glob("*.safetensors")) == sorted([new_a, store.get("C")["sha256"]])
