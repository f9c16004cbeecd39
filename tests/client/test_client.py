"""The walking skeleton end to end: MochiCluster -> store -> worker -> pipeline -> MP4, on the session's
cheap pool (`mochi`: Worker threads); re-attaching to a warm pool is Ray's (`ray_mochi`, the integration tier)."""

import numpy as np
import pytest

from mochi_lab import JobNotFound, MochiCluster, ParamsError
from mochi_lab.video import probe, read_frames


def test_generate_makes_a_playable_mp4(mochi, tiny):
    job = mochi.generate("a cat surfing a wave", seed=3, **tiny)
    path = job.result(timeout=300)
    info = probe(path)
    assert (info.frames, info.height, info.width, info.fps, info.codec) == (7, 32, 32, 8.0, "h264")
    assert job.status == "done"
    assert job.params.seed == 3
    assert job.thumbnail[:8] == b"\x89PNG\r\n\x1a\n"  # the PNG itself, on any backend
    t = job.timings
    assert {"queue_s", "load_s", "text_s", "denoise_s", "decode_s", "encode_s", "run_s"} <= set(t)
    assert t["load_s"] == 0  # the pool was warm before the job was queued
    assert job.progress["step"] == job.progress["total"] == 2
    assert job.record.meta["worker_id"] in {w["worker_id"] for w in mochi.workers()}
    video = job.video  # an ipywidgets.Video holding the MP4 itself
    assert video.format == "mp4" and video.value[4:8] == b"ftyp" and len(video.value) == path.stat().st_size


def test_same_seed_same_video_other_seed_other_video(mochi, tiny):
    a = mochi.generate("a red ball", seed=11, **tiny)
    b = mochi.generate("a red ball", seed=11, force=True, **tiny)  # a second run, not the cached one
    c = mochi.generate("a red ball", seed=12, **tiny)
    assert len({a.id, b.id, c.id}) == 3
    fa, fb, fc = (read_frames(j.result(timeout=300)) for j in (a, b, c))
    assert np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


def test_random_seed_is_recorded(mochi, tiny):
    job = mochi.generate("a red ball", **tiny)
    assert isinstance(job.params.seed, int)
    assert mochi.job(job.id).params.seed == job.params.seed


@pytest.mark.parametrize(
    "bad",
    [
        {"num_frames": 84},
        {"height": 100},
        {"width": 40},
        {"num_inference_steps": 0},
        {"num_inference_steps": 1000},
        {"guidance_scale": 99},
        {"seed": -1},
        {"fps": 0},
        {"model": "sora"},
        {"prompt": ""},
        {"num_frames": 7, "color": "blue"},
    ],
)
def test_bad_params_raise_before_anything_is_queued(mochi, bad):
    # the total, not the per-status counts: a job left by an earlier test may move on meanwhile
    before = sum(mochi.counts().values())
    prompt = bad.pop("prompt", "a cat")
    with pytest.raises(ParamsError) as err:
        mochi.generate(prompt, **bad)
    assert next(iter(bad or {"prompt": 0})) in str(err.value)
    assert sum(mochi.counts().values()) == before


def test_a_new_handle_reattaches_to_the_pool_and_the_job(ray_mochi, ray_settings, tiny):
    job = ray_mochi.generate("a boat", seed=5, **tiny)
    before = {w["worker_id"]: w["started_at"] for w in ray_mochi.workers()}
    again = MochiCluster(settings=ray_settings)
    assert {w["worker_id"]: w["started_at"] for w in again.workers()} == before  # nothing restarted
    assert again.job(job.id).result(timeout=300) == job.result(timeout=300)


def test_other_accounts_cannot_see_a_job(mochi, tiny):
    job = mochi.generate("alice's secret", seed=1, **tiny)
    bob = MochiCluster(backend=mochi.backend.for_account("bob"))  # the same store and pool, bob's view
    with pytest.raises(JobNotFound):
        bob.job(job.id)
    assert job.id not in {j.id for j in bob.jobs()}
    assert job.id in {j.id for j in mochi.jobs()}


def test_an_unreachable_store_fails_fast_naming_the_url_without_its_password(test_settings):
    import time

    from mochi_lab import StoreUnavailable

    bad = test_settings.model_copy(update={"redis_url": "redis://:hunter2@127.0.0.1:1/0"})
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        MochiCluster(settings=bad)
    assert time.monotonic() - t0 < 2.0
    assert "redis://***@127.0.0.1:1/0" in str(err.value) and "hunter2" not in str(err.value)
    assert "refused" in str(err.value).lower()


def test_a_data_dir_under_a_regular_file_is_a_clear_error(test_settings, tmp_path):
    from mochi_lab import StoreUnavailable

    (tmp_path / "file").write_text("not a folder")
    bad = test_settings.model_copy(update={"data_dir": tmp_path / "file" / "data"})
    with pytest.raises(StoreUnavailable, match=r"cannot create the SQLite store .*file/data.*Not a directory"):
        MochiCluster(settings=bad, start_pool=False)


@pytest.mark.parametrize("account", ["../../x", "a/b", ".hidden", "", "x" * 65])
def test_account_names_that_could_leave_the_artifacts_root_are_refused(account):
    from mochi_lab import Settings

    with pytest.raises(ValueError, match="account must be"):
        Settings(account=account)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"priority": "high"}, "priority"), ({"priority": 2**70}, "priority"), ({"tags": "abc"}, "tags"),
     ({"experiment": 123}, "experiment"), ({"num_frames": True}, "num_frames"), ({"seed": "7"}, "seed")],
)
def test_every_submit_argument_is_checked_before_anything_is_queued(mochi, tiny, options, field):
    before = mochi.counts()
    with pytest.raises(ParamsError, match=f"{field}: "):
        mochi.generate("a cat", **{**tiny, **options})
    assert mochi.counts() == before


def test_generate_takes_validated_params_as_they_are(mochi, tiny):
    from mochi_lab import GenerationParams

    p = GenerationParams.parse("a kite", seed=8, **tiny)
    job = mochi.generate(p)
    assert job.params == p
    with pytest.raises(ParamsError, match="either a GenerationParams or keyword params"):
        mochi.generate(p, seed=9)


def test_a_job_too_large_for_the_pool_is_refused_at_submit_naming_what_fits(mochi):
    before = mochi.counts()
    limit = mochi.backend.settings.max_token_steps["tiny"]
    with pytest.raises(ParamsError) as err:  # the request that once sat on step 0 for 5 minutes
        mochi.generate("a wedge", num_frames=283, height=1280, width=1280, num_inference_steps=200)
    msg = str(err.value)
    assert "size: 283 frames at 1280x1280 with 200 steps is 61,440,000 token-steps" in msg
    assert f"at most {limit:,}" in msg and "1 frame at 1280x1280 and 200 steps is too large" in msg
    with pytest.raises(ParamsError, match=r"at most \d+ frames fit"):
        mochi.generate("a long one", num_frames=283, height=480, width=848, num_inference_steps=64)
    assert mochi.counts() == before


def test_the_cadence_reads_faster_where_a_jobs_end_may_be_near():
    """The one rule of how often a job is read (Job.wait, the live views, the gateway's progress hub)."""
    from mochi_lab.client.follow import START_S, Cadence

    c = Cadence(0.5)
    assert c.delay("denoising", START_S + 1) == 0.5
    assert c.delay("decoding", START_S + 1) == c.delay("encoding", 60.0) == 0.1  # its last stages
    assert c.delay("denoising", 0.0) == c.delay("queued", START_S - 0.1) == 0.1  # its first seconds
    assert Cadence(1.0, 0.3).delay("encoding", 99.0) == 0.3
    with pytest.raises(ValueError, match="every_s must be a positive number"):
        Cadence(0)
    with pytest.raises(ValueError, match=r"near_s must be in \(0, every_s=0.1\]"):
        Cadence(0.1, 0.2)


def test_following_a_job_in_a_script_loads_no_template_engine(tmp_path):
    """The follower's notes come from the display's pure helpers; Jinja2 loads only when something renders."""
    import subprocess
    import sys

    script = f"""
import sys
from mochi_lab.client.direct import DirectBackend
from mochi_lab.client.job import Job
from mochi_lab.config import Settings
from mochi_lab.store import open_store

settings = Settings(data_dir={str(tmp_path)!r}, account="alice")
store = open_store(settings.store_url)
record = store.enqueue("alice", {{"prompt": "a kite", "num_inference_steps": 2}})
claim = store.claim("w", 60)
store.complete(record.id, claim.token, artifacts={{}}, timings={{"run_s": 1.0}}, meta={{}})
job = Job(DirectBackend(settings, store), record)
assert job.wait(timeout=30).status == "done" and job.follower.notes() == []
print("jinja2" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
