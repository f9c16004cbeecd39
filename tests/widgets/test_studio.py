"""The Studio drives real jobs on the session cluster; its traits must follow the job."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from traitlets import TraitError
from fakes import FakeCluster, FakeJob, record
from widget_helpers import drive, unique

from mochi_lab import LIMITS, GenerationParams, Job
from mochi_lab.widgets import JobCard, Studio
from mochi_lab.widgets.job_card import download_href

# A job long enough to catch mid-denoising on 2 busy cores (tiny model: ~0.03 s a step at this size).
LONG = {"num_frames": 19, "height": 64, "width": 96, "num_inference_steps": 200, "fps": 8}


def tiny_studio(mochi, tmp_path, prompt: str, **overrides) -> Studio:
    params = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8, **overrides}
    return Studio(mochi, prompt=prompt, download_dir=tmp_path / "videos", **params)


def test_controls_offer_only_valid_values(mochi):
    studio = Studio(mochi)
    assert studio.num_frames.options[:4] == (1, 7, 13, 19) and all((n - 1) % 6 == 0 for n in studio.num_frames.options)
    for name in ("height", "width"):
        sizes = getattr(studio, name).options
        assert sizes[0] == 16 and sizes[-1] == 1280 and all(s % 16 == 0 for s in sizes)
    assert (studio.steps.min, studio.steps.max) == LIMITS["num_inference_steps"] and studio.steps.max == 200
    assert (studio.guidance.min, studio.guidance.max) == (0.0, 30.0)
    assert (studio.seed.min, studio.seed.max) == (0, 2**32 - 1) and (studio.fps.min, studio.fps.max) == (1, 120)
    assert "tiny" in studio.model.options
    with pytest.raises(TraitError):
        studio.num_frames.value = 84  # Mochi would silently round it down
    with pytest.raises(TraitError):
        studio.height.value = 100
    # every offered value passes validation, so the form can only fail on the prompt
    GenerationParams.parse("x", num_frames=studio.num_frames.options[-1], height=1280, width=16)
    assert studio.seed.disabled and studio.random_seed.value
    studio.random_seed.value = False
    assert not studio.seed.disabled and studio.params()["seed"] == 0


def test_generate_click_runs_a_job_and_the_card_follows_it(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a fox in snow"))
    studio.generate_button.click()
    (job,) = studio.jobs
    card = studio.cards[0]
    assert job.params.num_frames == 7 and isinstance(job.params.seed, int)
    seen: list[tuple[str, int]] = []
    drive(lambda: (studio.poll_once(), seen.append((card.record.status, card.bar.value)))[0], lambda: card.finished)
    assert job.record.status == "done", job.record.error
    assert (card.bar.value, card.bar.max, card.bar.bar_style) == (2, 2, "success")
    assert card.eta.value.startswith("done in")
    assert card.cancel_button.layout.display == "none"
    assert not studio.poll_once()  # nothing left to poll: the kernel task would stop here
    video = Path(job.result())
    assert card.video.value == video.read_bytes() and card.video.value[4:8] == b"ftyp"
    assert card.thumbnail.value[:8] == b"\x89PNG\r\n\x1a\n" and card.thumbnail.value == job.thumbnail
    # job.save's copy beside the notebook, linked relative to the kernel's cwd (works on any backend)
    assert not card.link.is_absolute() and card.link.name == f"{job.id}.mp4"
    assert card.link.resolve().parent == (tmp_path / "videos").resolve() and card.link.read_bytes() == video.read_bytes()
    assert f'href="{download_href(card.link)}"' in card.result.children[1].children[-1].value
    assert [s for s, _ in seen][-1] == "done"


def test_params_error_is_shown_and_nothing_is_queued(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, "   ")
    before = mochi.counts()
    studio.generate_button.click()
    assert "prompt: prompt must be a non-empty string" in studio.error.value
    assert studio.jobs == [] and mochi.counts() == before
    studio.prompt.value = unique("a kite")
    assert studio.submit() is not None and studio.error.value == ""  # a good submit clears the error


def test_same_params_and_seed_reuse_the_job_without_a_second_card(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a lamp"), seed=7)
    first, again = studio.submit(), studio.submit()
    assert again.id == first.id and len(studio.cards) == 1
    assert first.id in studio.error.value and "reused" in studio.error.value
    drive(studio.poll_once, lambda: studio.cards[0].finished)


def test_cancel_button_stops_a_running_job(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a slow river"), **LONG)
    studio.generate_button.click()
    card = studio.cards[0]
    drive(studio.poll_once, lambda: card.record.stage == "denoising" and card.record.step >= 1 or card.finished)
    assert card.record.status == "running", "the job ended before it could be cancelled"
    assert card.eta.value.startswith("ETA")
    card.cancel_button.click()
    assert card.cancel_button.disabled and card.cancel_button.description == "Cancelling"
    drive(studio.poll_once, lambda: card.finished, timeout=60)
    r = card.record
    assert (r.status, card.bar.bar_style) == ("cancelled", "warning")
    assert card.bar.value < 200 and card.video is None
    assert card.cancel_button.layout.display == "none"


def test_failed_job_shows_its_error_and_traceback():
    # The card is a pure view of a record: a failed record needs no cluster (and no store reads).
    r = record(id="f-1", params={"prompt": "a <b>bold</b> idea"}, status="failed", stage="failed",
               error="RuntimeError: NaN latents <x>", traceback="Traceback (most recent call last):\n  ...")
    job = FakeJob(r)
    card = JobCard(job)
    assert "RuntimeError: NaN latents &lt;x&gt;" in card.error.value
    assert "<details><summary>traceback</summary>" in card.error.value
    assert "&lt;b&gt;bold" in card.header.value  # prompts are escaped
    assert card.bar.bar_style == "danger" and card.cancel_button.layout.display == "none"
    assert card.poll() is False and job.refreshes == 0  # finished: no store read


def test_a_deleted_job_shows_deleted_and_stops_polling():
    job = FakeJob(record())
    card = JobCard(job)
    job.deleted = True
    assert card.poll() is False and card.gone and card.eta.value == "deleted"
    assert card.poll() is False and job.refreshes == 1


def test_poll_task_runs_on_the_event_loop_and_stops_when_the_job_ends(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a heron"), interval=0.2)
    threads: set[str] = set()

    async def main() -> None:
        studio.generate_button.click()  # inside a running loop, as in a kernel: the poll task starts
        assert studio.stack.poller.running
        card = studio.cards[0]
        card.bar.observe(lambda _: threads.add(threading.current_thread().name), "value")
        await studio.wait(timeout=240)
        assert not studio.stack.poller.running

    asyncio.run(main())
    card = studio.cards[0]
    assert card.record.status == "done" and card.bar.value == 2 and card.video is not None
    assert threads == {threading.main_thread().name}  # trait updates came from the loop, not threads


async def _close_while_polling(studio: Studio, job) -> None:
    """Let the card poll its job, close the Studio: the poll task must end at once and read nothing more."""
    task = studio.stack.poller._task
    assert task is not None and not task.done()
    await asyncio.sleep(0.5)
    assert job.refreshes >= 2
    studio.close()
    await asyncio.sleep(0.01)  # far less than one interval: only a cancelled task can be done by now
    assert task.cancelled() and not studio.stack.poller.running
    after = job.refreshes
    await asyncio.sleep(0.6)
    assert job.refreshes == after  # no store read after close


def test_closing_the_studio_stops_polling(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a long road"), interval=0.2, **LONG)

    async def main() -> Job:
        job = studio.submit()
        refresh = job.refresh
        job.refreshes = 0

        def counted():
            job.refreshes += 1
            return refresh()

        job.refresh = counted  # the card polls through the handle: count its reads
        await _close_while_polling(studio, job)
        return job

    job = asyncio.run(main())
    job.cancel()  # free the worker for the other tests
    job.wait(timeout=60)


def test_closing_the_studio_stops_polling_without_a_cluster(tmp_path):
    cluster = FakeCluster()
    cluster.next_job = job = FakeJob(record(status="running"))  # never finishes
    studio = Studio(cluster, prompt="a long road", download_dir=tmp_path, interval=0.2)

    async def main() -> None:
        assert studio.submit() is job
        await _close_while_polling(studio, job)

    asyncio.run(main())


def test_download_dir_defaults_to_the_env_or_a_folder_beside_the_notebook(monkeypatch):
    from mochi_lab.widgets.job_card import default_download_dir

    monkeypatch.delenv("MOCHI_LAB_DOWNLOAD_DIR", raising=False)
    assert default_download_dir() == Path("mochi_videos")
    monkeypatch.setenv("MOCHI_LAB_DOWNLOAD_DIR", os.sep + "tmp")
    assert default_download_dir() == Path("/tmp")
