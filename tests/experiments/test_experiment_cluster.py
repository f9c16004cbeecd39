"""Experiments, the result cache and provenance end to end: the session's pool (real Worker threads) on
SQLite."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ipywidgets as w
import numpy as np
import pytest

from mochi_lab import ExperimentNotFound, MochiCluster
from mochi_lab.client.direct import DirectBackend
from mochi_lab.client.experiment import MISSING
from mochi_lab.video import probe, read_frames

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_wait_dataframe_compare_export(mochi, tiny, tmp_path):
    # A worker that last served another model (the NaN-weights test) reloads tiny: only the others are warm.
    warm = {w["worker_id"] for w in mochi.workers() if w["model"] == "tiny" and w["state"] in ("idle", "busy")}
    exp = mochi.experiment("e2e-sweep", description="two by two", tags=["e2e"])
    jobs = exp.sweep(["a cat surfing", "a dog skating"], [1, 2], **tiny)
    assert exp.wait(timeout=300, progress=False)["done"] == 4
    df = exp.to_dataframe(all_columns=True)
    assert len(df) == 4 and set(df["status"]) == {"done"}
    assert list(df["job_id"]) == [j.id for j in jobs]
    assert list(zip(df["prompt"], df["seed"], strict=True)) == [("a cat surfing", 1), ("a cat surfing", 2),
                                                   ("a dog skating", 1), ("a dog skating", 2)]
    assert (df["run_s"] > 0).all() and (df["denoise_s"] > 0).all()
    on_warm = df["worker_id"].isin(warm)
    assert on_warm.any() and (df.loc[on_warm, "load_s"] == 0).all()
    assert (df["finished_at"] >= df["created_at"]).all()
    assert all(probe(p).frames == 7 for p in df["video"])
    assert {j.record.experiment for j in mochi.jobs(experiment="e2e-sweep")} == {"e2e-sweep"}

    grid = exp.compare(download_dir=tmp_path / "videos")
    assert isinstance(grid, w.DOMWidget) and len(grid.cells) == 4
    # its stand-in for the saved notebook: every run's poster (the worker's thumbnail) linked to its copy
    static = grid.static_html()
    assert static.count('<img src="data:image/jpeg;base64,') == 4 and "needs the kernel" in static
    assert all((tmp_path / "videos" / f"{j.id}.mp4").read_bytes() == j.result().read_bytes() for j in jobs)
    # seeds across, prompts down: only what differs labels the axes
    assert (grid.row_param, grid.row_labels) == ("prompt", ["a cat surfing", "a dog skating"])
    assert (grid.col_param, grid.col_labels) == ("seed", ["1", "2"])
    for job, (prompt, seed) in zip(jobs, [("a cat surfing", "1"), ("a cat surfing", "2"), ("a dog skating", "1"),
                                          ("a dog skating", "2")], strict=True):
        cell = grid.cell(prompt, seed)
        assert cell["job_id"] == job.id and grid.videos[cell["video"]] == job.result().read_bytes()

    out = exp.export(tmp_path / "out")
    assert len(list(out.glob("*.mp4"))) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["file"] for r in manifest["runs"]] == sorted(p.name for p in out.glob("*.mp4"))
    assert np.array_equal(read_frames(out / manifest["runs"][0]["file"]), read_frames(df["video"][0]))


def test_experiments_are_listed_newest_first_and_private(mochi, test_settings):
    mochi.experiment("listed-old")
    time.sleep(0.01)
    mochi.experiment("listed-new")
    names = [e.name for e in mochi.experiments()]
    assert names.index("listed-new") < names.index("listed-old")
    bob = MochiCluster(backend=DirectBackend(test_settings.model_copy(update={"account": "bob"}), mochi.backend.store))
    assert "listed-new" not in [e.name for e in bob.experiments()]
    with pytest.raises(ExperimentNotFound):
        bob.experiment("listed-new", create=False)
    with pytest.raises(ValueError, match="experiment name"):
        mochi.experiment("bad name")


def test_result_cache_reuses_done_and_inflight_jobs_unless_forced(mochi, tiny):
    first = mochi.generate("a cached lighthouse", seed=21, **tiny)
    assert mochi.generate("a cached lighthouse", seed=21, **tiny).id == first.id  # in flight
    first.result(timeout=300)
    assert mochi.generate("a cached lighthouse", seed=21, **tiny).id == first.id  # done
    forced = mochi.generate("a cached lighthouse", seed=21, force=True, **tiny)
    assert forced.id != first.id
    assert mochi.generate("a cached lighthouse", seed=22, **tiny).id != first.id


def test_cancelled_jobs_are_not_served_from_the_cache(mochi, hold, tiny):
    hold("a cancelled comet", "denoising", step=1)  # neither job can finish before it is cancelled
    job = mochi.generate("a cancelled comet", seed=3, **tiny)
    job.cancel()
    job.wait(timeout=120)
    assert job.status == "cancelled"
    again = mochi.generate("a cancelled comet", seed=3, **tiny)
    assert again.id != job.id and again.status in ("queued", "running")
    again.cancel()
    again.wait(timeout=120)


def test_reproduce_gives_identical_frames_and_provenance(mochi, tiny):
    job = mochi.generate("a reproducible sunrise", **tiny)  # random seed, resolved and recorded
    twin = job.reproduce()
    assert twin.id != job.id and twin.params == job.params
    assert f"reproduces:{job.id}" in twin.record.tags
    a, b = (read_frames(j.result(timeout=300)).astype(int) for j in (job, twin))
    # The same video, from whichever of the pool's workers ran each. Once in many runs two CPU workers
    # gave pixels 2 levels apart (float rounding, re-encoded by H.264): up to 4 is tolerated, and shown.
    diff = np.abs(a - b)
    workers = (job.record.meta.get("worker_id"), twin.record.meta.get("worker_id"))
    assert a.shape == b.shape and diff.max() <= 4 and diff.mean() < 0.05, (diff.max(), diff.mean(), workers)
    meta = job.refresh().meta
    assert meta["seed"] == job.params.seed and meta["model"] == "tiny"
    assert meta["model_revision"].startswith("sha256:")
    assert meta["model_revision"] == twin.refresh().meta["model_revision"]
    assert set(meta["versions"]) == {"mochi_lab", "diffusers", "torch"}
    assert meta["device"] in ("cpu", "cuda") and meta["python"].count(".") == 2


def test_sweep_resumed_after_its_client_was_killed(mochi, test_settings):
    name = "killed-sweep"
    # another process that only submits; the session's thread workers run its jobs
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sweep_client", test_settings.model_dump_json(), name, "3"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy(), cwd=ROOT,
    )
    try:
        queued = []
        for line in proc.stdout:  # blocks until the client prints
            if line.startswith("queued"):
                queued.append(line.split()[2])
            if line.startswith("hanging"):
                break
        assert len(queued) == 3
        deadline = time.monotonic() + 300
        while sum(mochi.job(i).status == "done" for i in queued) < 1:  # let the pool finish at least one
            assert time.monotonic() < deadline
            time.sleep(0.2)
        done_before_kill = sum(mochi.job(i).status == "done" for i in queued)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    exp = mochi.experiment(name)
    total = len(exp.runs)
    before = exp.status()
    requeued = exp.resume()
    print(f"\nresume after kill: runs total={total}, jobs queued before kill={len(queued)}, "
          f"done before kill={done_before_kill}, re-queued by resume={len(requeued)}, status before resume={before}")
    assert total == 6 and before[MISSING] == 3
    assert len(requeued) == 3 and not {j.id for j in requeued} & set(queued)
    assert exp.resume() == []
    assert exp.wait(timeout=300, progress=False)["done"] == 6
    assert len(mochi.jobs(experiment=name, limit=100)) == 6  # no run was queued twice


def test_cli_runs_a_spec_and_prints_timings_per_steps_value(mochi, monkeypatch, capsys):
    from mochi_lab import cli

    # The spec runner on the session's pool; how the CLI finds a pool (--address, RAY_ADDRESS, the local
    # runtime) is tests/test_cli.py's to test.
    monkeypatch.setattr(cli, "_cluster", lambda args, model: mochi)
    spec = str(ROOT / "experiments" / "steps_vs_quality.yaml")
    assert cli.main(["experiment", "run", spec, "--wait", "--timeout", "600"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["2", "4", "8"]  # one row per steps value
    assert all(r[1:3] == ["2", "2"] for r in rows)  # runs, done
    denoise = [float(r[3]) for r in rows]
    assert denoise[0] > 0 and denoise[2] > denoise[0]  # more steps cost more denoising time
    # re-running the spec is idempotent
    assert cli.main(["experiment", "run", spec]) == 0
    assert len(mochi.jobs(experiment="steps-vs-quality", limit=100)) == 6
