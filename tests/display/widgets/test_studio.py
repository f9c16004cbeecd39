"""The Studio drives real jobs on the session cluster; its traits must follow the job."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import pytest

from mochi_lab import Job, ParamsError
from mochi_lab.display.widgets import JobCard, Studio
from tests.support.fakes import FakeCluster, FakeJob, Scan, record
from tests.support.jobkit import TINY
from tests.support.lora import make_adapter
from tests.support.widget_helpers import drive, unique, until


def tiny_studio(mochi, tmp_path, prompt: str, **overrides) -> Studio:
    return Studio(mochi, prompt=prompt, download_dir=tmp_path / "videos", **{**TINY, **overrides})


GPU_ROW = {"worker_id": "w-0", "device": "cuda", "gpu_name": "H100", "model": "mochi-1-preview", "state": "idle"}
CPU_ROW = {"worker_id": "w-0", "device": "cpu", "gpu_name": None, "model": "tiny", "state": "idle"}


def test_size_presets_and_defaults_follow_the_pools_device(mochi):
    studio = Studio(mochi)  # the session's workers are CPU workers
    assert studio.device == "cpu"
    labels = dict((v, k) for k, v in studio.size.options)
    assert {(848, 480), (480, 848), (640, 640), (432, 240), "custom"} <= set(labels)
    assert len(studio.size.options) < 10  # presets, not 80-entry lists
    p = studio.params()
    assert (p["width"], p["height"], p["num_inference_steps"], p["fps"]) == (432, 240, 8, 8)
    assert studio.size.value == (432, 240) and studio.custom_size.layout.display == "none"
    gpu = Studio(FakeCluster(workers=[GPU_ROW], models=["mochi-1-preview"]))
    p = gpu.params()
    assert gpu.device == "cuda" and (p["width"], p["height"], p["num_inference_steps"], p["fps"]) == (848, 480, 64, 30)
    assert (p["num_frames"], p["guidance_scale"]) == (19, 4.5)  # GenerationParams' defaults
    assert Studio(FakeCluster(workers=[CPU_ROW])).device == "cpu"
    assert Studio(FakeCluster(fail=RuntimeError("down"))).device == "cpu"  # unreadable pool: the safe choice
    # a preset fills the size; "custom" opens the two fields
    gpu.size.value = (480, 848)
    assert (gpu.params()["width"], gpu.params()["height"]) == (480, 848)
    gpu.size.value = "custom"
    assert gpu.custom_size.layout.display is None
    gpu.width.value, gpu.height.value = 320, 176
    assert (gpu.params()["width"], gpu.params()["height"]) == (320, 176) and not gpu.check()
    # starting values that are no preset open the custom fields
    small = Studio(FakeCluster(), width=32, height=48)
    assert small.size.value == "custom" and (small.width.value, small.height.value) == (32, 48)


def test_the_length_is_typed_in_seconds_or_frames_and_the_other_follows():
    studio = Studio(FakeCluster(), prompt="a kite", fps=8, num_frames=7)
    assert studio.duration.value == 7 / 8 and studio.params()["num_frames"] == 7  # the starting frames survive
    for fps, seconds_, frames in ((8, 1.0, 7), (8, 2.0, 13), (30, 2.8, 85), (30, 5.4, 163), (24, 0.01, 1)):
        studio.fps.value, studio.duration.value = fps, seconds_
        assert studio.params()["num_frames"] == frames and (frames - 1) % 6 == 0
        assert studio.frames.value == frames and studio.duration.value == seconds_  # the seconds stay as typed
    studio.fps.value = 8
    studio.frames.value = 13  # 13 frames, typed as frames (no 1.625 s to work out)
    assert studio.duration.value == 1.625 and studio.params()["num_frames"] == 13 and studio.check() == {}
    studio.fps.value = 24  # the frames stay (they set the cost); their seconds follow
    assert (studio.frames.value, studio.duration.value) == (13, 0.542)
    studio.frames.value = 14
    errors = studio.check()
    assert list(errors) == ["num_frames"] and "frames: must be of the form 6k+1" in errors["num_frames"]
    assert "nearest valid values are 13 or 19" in errors["num_frames"] and studio.generate_button.disabled
    studio.frames.value = 13
    assert studio.check() == {} and not studio.generate_button.disabled
    studio.fps.value, studio.duration.value = 30, 10.0  # 300 frames: too long, said next to the duration
    errors = studio.check()
    assert "duration: 10 s at 30 fps is 301 frames; at most 283 frames (9.4 s at 30 fps)" in errors["duration"]
    assert studio.submit() is None and studio.cluster.generated == []
    studio.duration.value = 0.0
    assert "duration: must be more than 0 s" in studio.check()["duration"]
    studio.duration.value = 2.0
    assert studio.check() == {} and studio.submit() is not None


@pytest.mark.parametrize("field, widget, value, message", [
    ("guidance_scale", "guidance", 99.0, "guidance: must be between 0.0 and 30.0, got 99.0"),
    ("fps", "fps", 0, "fps: must be between 1 and 120, got 0"),
    ("seed", "seed", -5, "seed: must be between 0 and 4294967295"),
    ("num_inference_steps", "steps", 1, "steps: must be between 2 and 200, got 1"),
    ("size", "width", 100, "width: must be a multiple of 16 between 16 and 1280, got 100; nearest valid values are 96 or 112"),
])
def test_invalid_typed_values_are_errors_next_to_their_field_never_clamped(field, widget, value, message):
    cluster = FakeCluster()
    studio = Studio(cluster, prompt="a kite", seed=3)
    studio.size.value = "custom"
    assert studio.check() == {}
    getattr(studio, widget).value = value  # typed into the field
    assert getattr(studio, widget).value == value  # kept as typed: nothing clamps it
    errors = studio.check()
    assert list(errors) == [field] and message in errors[field]  # shown next to its field, and only there
    label = getattr(studio, widget).description
    assert Scan(errors[field]).text.startswith(f"{label}: ")  # in the form's words: the label beside the field
    assert "word-break: normal" in errors[field] and "<pre" not in errors[field]  # wrapped between words only
    assert studio.generate_button.disabled and studio.generate_button.tooltip  # nothing to press until fixed
    assert studio.submit() is None and cluster.generated == []  # nothing queued
    assert studio.error.value == ""


def test_prompt_errors_are_labelled_prompt_and_stale_errors_clear(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, "   ")
    assert studio.check() == {}  # an empty form is not an error until Generate is pressed
    before = mochi.counts()
    studio.generate_button.click()
    assert "prompt: must be a non-empty string" in studio.field_errors["prompt"].value
    assert studio.jobs == [] and mochi.counts() == before
    studio.prompt.value = unique("a kite")  # fixing it clears the error at once
    assert studio.field_errors["prompt"].value == ""
    assert studio.submit() is not None and studio.error.value == ""
    assert all(box.value == "" for box in studio.field_errors.values())
    drive(studio.poll_once, lambda: studio.cards[0].finished)


def test_the_backends_refusals_go_next_to_their_field_and_clear_on_the_next_attempt():
    cluster = FakeCluster()
    studio = Studio(cluster, prompt="a kite")
    cluster.fail = ParamsError("invalid generation parameters:\n  model: must be one of tiny, got 'x'\n"
                               "  size: 13 frames at 432x240 with 8 steps is 99 token-steps; this pool admits 9")
    assert studio.submit() is None
    assert "model: must be one of tiny" in studio.field_errors["model"].value
    assert "this pool admits 9" in studio.field_errors["size"].value
    cluster.fail = RuntimeError("store down")
    assert studio.submit() is None
    assert studio.field_errors["model"].value == "" and "RuntimeError: store down" in studio.error.value
    cluster.fail = None
    assert studio.submit() is not None and studio.error.value == ""


def test_a_notice_clears_when_the_form_changes():
    cluster = FakeCluster()
    studio = Studio(cluster, prompt="a kite", seed=3)
    first = studio.submit()
    cluster.next_job = first  # the result cache hands back the same job
    assert studio.submit() is first and "reused" in studio.error.value
    studio.seed.value = 4  # a new seed: the notice is about the old form
    assert studio.error.value == ""
    cluster.fail = ParamsError("invalid generation parameters:\n  model: must be one of tiny, got 'x'")
    assert studio.submit() is None and "model: must be one of tiny" in studio.field_errors["model"].value
    studio.steps.value = 4
    assert studio.field_errors["model"].value == "" and not studio.generate_button.disabled


def test_the_model_menu_lists_what_the_pools_workers_serve(mochi):
    # the session's CPU workers run the tiny model: mochi-1-preview is accepted by name but no worker has it
    assert "mochi-1-preview" in mochi.models()
    studio = Studio(mochi)
    assert list(studio.model.options) == ["tiny"] and studio.model.value == "tiny"
    gpu = Studio(FakeCluster(workers=[GPU_ROW, {**GPU_ROW, "worker_id": "w-1", "model": "tiny"}],
                             models=["mochi-1-preview", "tiny"], model="mochi-1-preview"))
    assert list(gpu.model.options) == ["mochi-1-preview", "tiny"] and gpu.model.value == "mochi-1-preview"
    # no worker to go by (none started yet, or unreadable): the cluster's model
    assert list(Studio(FakeCluster(workers=[], models=["mochi-1-preview", "tiny"])).model.options) == ["tiny"]
    # a model asked for by name is offered (its jobs wait for a worker that serves it)
    asked = Studio(FakeCluster(workers=[CPU_ROW], models=["mochi-1-preview", "tiny"]), model="mochi-1-preview")
    assert list(asked.model.options) == ["mochi-1-preview", "tiny"] and asked.model.value == "mochi-1-preview"


def test_generate_is_disabled_while_a_submission_is_in_flight():
    release = threading.Event()

    class SlowCluster(FakeCluster):
        def generate(self, prompt, **params):
            assert release.wait(10)
            return super().generate(prompt, **params)

    cluster = SlowCluster()
    studio = Studio(cluster, prompt="a kite", interval=0.05)

    async def main() -> None:
        studio.generate_button.click()  # in a kernel: queued from a worker thread, the loop stays free
        await asyncio.sleep(0.1)
        assert studio.generate_button.disabled and studio.generate_button.description == "Submitting…"
        studio.generate_button.click()  # a click that was on its way: ignored
        release.set()
        await asyncio.wait_for(studio._submission, 10)
        assert not studio.generate_button.disabled and studio.generate_button.description == "Generate"
        studio.close()

    asyncio.run(main())
    assert len(cluster.generated) == 1 and len(studio.cards) == 1


def test_generate_click_runs_a_job_and_the_card_follows_it(mochi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernel's cwd is the notebook's folder
    studio = Studio(mochi, prompt=unique("a fox in snow"), download_dir=Path("videos"), num_frames=7, height=32,
                    width=32, num_inference_steps=2, fps=8)
    studio.generate_button.click()
    (job,) = studio.jobs
    card = studio.cards[0]
    assert job.params.num_frames == 7 and isinstance(job.params.seed, int)
    seen: list[tuple[str, float]] = []
    drive(lambda: (studio.poll_once(), seen.append((card.record.status, card.bar.value)))[0], lambda: card.finished)
    assert job.record.status == "done", job.record.error
    assert (card.bar.value, card.bar.max, card.bar.bar_style) == (1, 1, "success")
    bars = [value for _, value in seen]
    assert bars == sorted(bars), seen  # the whole job's bar never goes back
    # the status once (the badge): the live row is hidden, and the timings are one line ending in the total
    assert card.progress_row.layout.display == "none" and card.eta.value == ""
    assert card.header.value.count(">done<") == 1 and "done" not in card.timings.value
    assert re.fullmatch(r"queue [\d.]+ s · load [\d.]+ s · (text [\d.]+ s · )?denoise [\d.]+ s · decode [\d.]+ s · "
                        r"encode [\d.]+ s · total [\d.]+ s", Scan(card.timings.value).text), card.timings.value
    assert card.cancel_button.layout.display == "none"
    assert not studio.poll_once()  # nothing left to poll: the kernel task would stop here
    video = Path(job.result())
    assert card.video.value == video.read_bytes() and card.video.value[4:8] == b"ftyp"
    assert card.thumbnail is None and card.video in card.result.children  # no thumbnail beside the video
    assert card.thumbnail_uri.startswith("data:image/jpeg;base64,")  # kept for the static view
    # job.save's copy beside the notebook, linked relative to it through the front end's HTML renderer
    assert card.link == Path("videos") / f"{job.id}.mp4" and card.link.read_bytes() == video.read_bytes()
    assert f'href="./videos/{job.id}.mp4"' in card.download_html
    assert card.download.outputs[0]["data"]["text/html"] == card.download_html
    static = card.static_html()
    assert f'src="./videos/{job.id}.mp4"' in static and 'poster="data:image/jpeg;base64,' in static
    assert [s for s, _ in seen][-1] == "done"


def test_cards_collapse_and_clear_without_touching_their_job(tmp_path):
    cluster = FakeCluster()
    cluster.next_job = job = FakeJob(record(status="running", attempts=1))
    studio = Studio(cluster, prompt="a long road", download_dir=tmp_path)
    studio.submit()
    card = studio.cards[0]
    card.collapse_button.click()
    assert card.collapsed and card.body.layout.display == "none" and card.collapse_button.icon == "chevron-right"
    card.collapse_button.click()
    assert not card.collapsed and card.body.layout.display is None
    assert studio.poll_once() and job.refreshes == 1
    card.clear_button.click()
    assert studio.cards == [] and card.comm is None  # gone from the Studio, and closed
    assert not studio.poll_once() and job.refreshes == 1 and job.cancels == 0  # not read again, not cancelled
    # "Clear finished" removes only the cards of jobs that have ended
    done = FakeJob(record(id="d-1", status="done", stage="done"))
    cluster.next_job = done
    studio.submit()
    cluster.next_job = running = FakeJob(record(id="r-1", status="running"))
    studio.submit()
    studio.clear_button.click()
    assert [c.job for c in studio.cards] == [running]


def test_same_params_and_seed_reuse_the_job_without_a_second_card(mochi, tmp_path):
    studio = tiny_studio(mochi, tmp_path, unique("a lamp"), seed=7)
    first, again = studio.submit(), studio.submit()
    assert again.id == first.id and len(studio.cards) == 1
    assert first.id in studio.error.value and "reused" in studio.error.value
    drive(studio.poll_once, lambda: studio.cards[0].finished)


def test_cancel_button_stops_a_running_job(mochi, hold, tmp_path):
    prompt = unique("a slow river")
    hold(prompt, "denoising", step=1)
    studio = tiny_studio(mochi, tmp_path, prompt)
    studio.generate_button.click()
    card = studio.cards[0]
    drive(studio.poll_once, lambda: card.record.stage == "denoising" and card.record.step >= 1 or card.finished)
    assert card.record.status == "running", "the job ended before it could be cancelled"
    assert "ETA" in card.eta.value and "denoising 1/2" in card.stage.value
    card.cancel_button.click()
    assert card.cancel_button.disabled and card.cancel_button.description == "Cancelling"
    drive(studio.poll_once, lambda: card.finished, timeout=60)
    r = card.record
    assert (r.status, card.bar.bar_style) == ("cancelled", "warning")
    assert card.bar.value < 1 and card.video is None
    assert card.cancel_button.layout.display == "none"
    # where it stopped: the step it reached (the store keeps the last step reported)
    assert f"stopped at denoising step {r.step}/2" in card.notes.value and r.step == 1


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


def test_a_queued_card_shows_its_place_and_a_lost_worker_as_a_line():
    job = FakeJob(record(status="queued", stage="queued", attempts=0, step=0))
    job.position = {"position": 3, "queued": 5, "eta_s": 118.0, "workers": 2}
    card = JobCard(job)
    assert card.poll()
    assert "3rd of 5 in the queue · ~2 min" in card.notes.value
    assert card.eta.value.startswith("waiting")
    # claimed, then its worker dies in decoding; the job is queued again, then retried
    job._history = [record(status="running", stage="denoising", step=2, total_steps=2, attempts=1),
                    record(status="running", stage="decoding", step=2, total_steps=2, attempts=1),
                    record(status="queued", stage="queued", step=2, total_steps=2, attempts=1),
                    record(status="running", stage="denoising", step=1, total_steps=2, attempts=2)]
    card.poll()
    assert "queued" not in card.notes.value and card.bar.value == 1  # no live figures: the steps' share
    card.poll()
    card.poll()
    assert "worker lost at decoding; queued again for attempt 2" in card.notes.value
    card.poll()
    assert "worker lost at decoding; retrying, attempt 2" in card.notes.value
    assert card.bar.value == 0.5 and "attempt 2" in card.header.value  # the bar starts again, and says why


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
        studio.generate_button.click()  # inside a running loop, as in a kernel: queued off the loop...
        assert studio.submitting and studio._submission is not None
        await asyncio.wait_for(asyncio.shield(studio._submission), 60)
        assert studio.stack.poller.running  # ... then the poll task starts
        card = studio.cards[0]
        card.bar.observe(lambda _: threads.add(threading.current_thread().name), "value")
        await studio.wait(timeout=240)
        assert not studio.stack.poller.running

    asyncio.run(main())
    card = studio.cards[0]
    assert card.record.status == "done" and card.bar.value == 1 and card.video is not None
    assert threads == {threading.main_thread().name}  # trait updates came from the loop, not threads


async def _close_while_polling(studio: Studio, job) -> None:
    """Let the card poll its job, close the Studio: the poll task must end at once and read nothing more."""
    task = studio.stack.poller._task
    assert task is not None and not task.done()
    await until(lambda: job.refreshes >= 2)
    studio.close()
    await asyncio.sleep(0.01)  # far less than one interval: only a cancelled task can be done by now
    assert task.cancelled() and not studio.stack.poller.running
    after = job.refreshes
    await asyncio.sleep(0.6)
    assert job.refreshes == after  # no store read after close


def test_closing_the_studio_stops_polling(mochi, hold, tmp_path):
    prompt = unique("a long road")
    hold(prompt, "denoising", step=1)  # running until cancelled: the card keeps polling it
    studio = tiny_studio(mochi, tmp_path, prompt, interval=0.2)

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


def test_the_notebook_file_gets_the_studios_static_stand_in(tmp_path):
    """The save hook keeps a Studio's static stand-in in the file and leaves the live widget out."""
    from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME
    from mochi_lab.display.widgets.save_hook import pre_save, strip_live_widgets

    cluster = FakeCluster()
    cluster.next_job = FakeJob(record(status="done", stage="done", params={"prompt": "a paper boat"}))
    studio = Studio(cluster, prompt="a paper boat", download_dir=tmp_path)
    published: list[tuple[str, dict]] = []

    class Handle:
        def update(self, bundle, raw):
            published.append(("update", bundle))

    studio._snapshots.append(Handle())  # what _ipython_display_ keeps for its display id
    studio.submit()
    (_, bundle), *_ = published  # the card was added: the stand-in follows
    assert set(bundle) == {"text/plain", STATIC_MIME} and "a paper boat" in bundle[STATIC_MIME]
    assert bundle["text/plain"] == ""  # nothing visible beside the live widget
    widget = {WIDGET_MIME: {"model_id": "abc", "version_major": 2}, "text/plain": "Studio"}
    other = {WIDGET_MIME: {"model_id": "def", "version_major": 2}, "text/plain": "IntSlider()"}
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": widget, "metadata": {"mochi_lab": {"live_widget": True}}},
        {"output_type": "display_data", "data": dict(bundle), "metadata": {}},
        {"output_type": "display_data", "data": other, "metadata": {}},  # someone else's widget: untouched
    ]}, {"cell_type": "markdown", "source": "x"}]}
    pre_save({"type": "notebook", "content": nb})
    outputs = nb["cells"][0]["outputs"]
    assert [set(o["data"]) for o in outputs] == [{"text/plain", "text/html"}, {WIDGET_MIME, "text/plain"}]
    assert outputs[0]["data"]["text/html"] == bundle[STATIC_MIME] and "mochi-studio-static" in bundle[STATIC_MIME]
    assert strip_live_widgets(nb) == 0  # saving again changes nothing
    pre_save({"type": "file", "content": "x"})  # not a notebook: left alone


def test_download_dir_defaults_to_the_env_or_a_folder_beside_the_notebook(monkeypatch):
    from mochi_lab.display.widgets.job_card import default_download_dir

    monkeypatch.delenv("MOCHI_LAB_DOWNLOAD_DIR", raising=False)
    assert default_download_dir() == Path("mochi_videos")
    monkeypatch.setenv("MOCHI_LAB_DOWNLOAD_DIR", os.sep + "tmp")
    assert default_download_dir() == Path("/tmp")


def test_where_the_save_hook_is_off_the_cell_says_so_and_how_to_turn_it_on(tmp_path, monkeypatch):
    import json

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME
    from mochi_lab.display.widgets.save_hook import ENABLE, HOOK, save_hook_enabled

    def config(name: str, on: bool) -> str:
        folder = tmp_path / name / "jupyter_server_config.d"
        folder.mkdir(parents=True)
        (folder / "zz.json").write_text(json.dumps({"ServerApp": {"jpserver_extensions": {HOOK: on}}}))
        return str(folder.parent)

    InteractiveShell.instance()  # what a kernel has: display() publishes outputs
    studio = Studio(FakeCluster(), prompt="a kite")
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", config("off", False))  # the highest-priority folder turns it off
    assert save_hook_enabled() is False
    with capture_output() as shown:
        studio._ipython_display_()
    live, stand_in, notice = shown.outputs
    assert WIDGET_MIME in live.data and live.metadata == {"mochi_lab": {"live_widget": True}}
    assert STATIC_MIME in stand_in.data
    assert "save hook is off" in notice.data["text/html"] and ENABLE in notice.data["text/html"]
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", config("on", True))
    assert save_hook_enabled() is True
    with capture_output() as shown:
        studio._ipython_display_()
    assert len(shown.outputs) == 2  # the widget and its stand-in, nothing to warn about


def test_the_adapter_menu_offers_the_accounts_adapters_and_a_choice_reaches_the_job(mochi, tmp_path):
    """None by default (the scale disabled); a picked adapter and scale are the job's `lora`, resolved to the
    file's sha256 and applied by the worker; a scale out of range is an error beside the menu, never clamped."""
    name = unique("studio-style").replace(" ", "-")
    sha = mochi.adapters.upload(make_adapter(tmp_path / "made" / "style.safetensors", seed=1), name=name)["sha256"]
    studio = tiny_studio(mochi, tmp_path, unique("a kite with a style"), seed=3)
    assert studio.lora.value is None and studio.lora_scale.disabled and studio.params()["lora"] is None
    assert studio.lora.options[0] == ("none", None)
    assert (f"{name} (tiny, rank 4)", name) in studio.lora.options
    studio.lora.value = name
    assert not studio.lora_scale.disabled
    studio.lora_scale.value = 3.0
    assert studio.check() == {"lora": studio.field_errors["lora"].value} and studio.generate_button.disabled
    assert "LoRA: an adapter&#39;s scale is between -2.0 and 2.0, got 3.0" in studio.field_errors["lora"].value
    studio.lora_scale.value = 0.5
    assert studio.check() == {}
    done = studio.submit().wait(timeout=300)
    assert done.status == "done", done.error
    assert done.params["lora"] == [{"name": name, "scale": 0.5, "sha256": sha}]
    assert [(a["name"], a["scale"]) for a in done.meta["lora"]] == [(name, 0.5)]
    studio.lora.value = None  # back to none: the scale is off and the next job is the base model's
    assert studio.lora_scale.disabled and studio.params()["lora"] is None


def test_the_adapter_menu_is_none_alone_when_adapters_cannot_be_read_and_starts_where_asked():
    studio = Studio(FakeCluster(), prompt="a kite")  # no adapters API at all
    assert studio.lora.options == (("none", None),) and studio.params()["lora"] is None
    asked = Studio(FakeCluster(), prompt="a kite", lora=("style", 0.8))  # the backend says at submit if it is there
    assert asked.lora.options == (("none", None), ("style", "style")) and not asked.lora_scale.disabled
    assert asked.params()["lora"] == [("style", 0.8)] and asked.check() == {}
