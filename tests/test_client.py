"""The walking skeleton end to end: MochiCluster -> store -> Ray worker -> pipeline -> MP4."""

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
    assert job.thumbnail is not None and job.thumbnail.exists()
    t = job.timings
    assert {"queue_s", "load_s", "text_s", "denoise_s", "decode_s", "encode_s", "run_s"} <= set(t)
    assert t["load_s"] == 0  # the pool was warm before the job was queued
    assert job.progress["step"] == job.progress["total"] == 2
    assert job.record.meta["worker_id"].startswith("mochi-worker-")
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
    before = mochi.counts()
    prompt = bad.pop("prompt", "a cat")
    with pytest.raises(ParamsError) as err:
        mochi.generate(prompt, **bad)
    assert next(iter(bad or {"prompt": 0})) in str(err.value)
    assert mochi.counts() == before


def test_a_new_handle_reattaches_to_the_pool_and_the_job(mochi, test_settings, tiny):
    job = mochi.generate("a boat", seed=5, **tiny)
    before = {w["worker_id"]: w["started_at"] for w in mochi.workers()}
    again = MochiCluster(settings=test_settings)
    assert {w["worker_id"]: w["started_at"] for w in again.workers()} == before  # nothing restarted
    assert again.job(job.id).result(timeout=300) == job.result(timeout=300)


def test_other_accounts_cannot_see_a_job(mochi, test_settings, tiny):
    job = mochi.generate("alice's secret", seed=1, **tiny)
    bob = MochiCluster(settings=test_settings.model_copy(update={"account": "bob"}), start_pool=False)
    with pytest.raises(JobNotFound):
        bob.job(job.id)
    assert job.id not in {j.id for j in bob.jobs()}
    assert job.id in {j.id for j in mochi.jobs()}
