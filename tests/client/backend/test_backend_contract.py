"""The backend contract (mochi_lab.client.backend.Backend), run against both backends (see conftest: `backend` is
the direct backend, then the gateway backend through the real gateway and JupyterHub; `other` is another
account of the same kind). A handle, a widget or a notebook must not be able to tell them apart: the same
calls give the same answers and raise the same exceptions. Running jobs are acted on only where the test
gate holds them."""

from __future__ import annotations

import io
import json
import pickle
import uuid

import pytest
from PIL import Image

from mochi_lab import Experiment, JobNotFound, MochiCluster, ParamsError, StoreUnavailable
from mochi_lab.adapters import AdapterNotFound, AdapterRejected
from mochi_lab.client.backend import WORKER_FIELDS
from mochi_lab.config import known_models
from mochi_lab.model import STATUSES, QuotaExceeded
from mochi_lab.params import GenerationParams, SubmitOptions
from mochi_lab.video import probe, read_frames
from tests.support.backends import QUOTA, finish, held, submit, tiny, unique
from tests.support.jobkit import TINY
from tests.support.lora import lie, make_adapter, renamed, with_rank

UNKNOWN = "18c0c0c0c0c-0123456789ab"  # a well-formed id that no job has


# -- submit --------------------------------------------------------------------------------------------
def test_submit_queues_a_job_of_this_account_with_its_options(backend):
    prompt = unique("a red fox in the snow")
    job = submit(backend, prompt, priority=3, tags=["fox", "snow"], experiment="foxes")
    assert job.account == backend.account and job.status in ("queued", "running")
    assert job.params == tiny(prompt).to_dict()
    assert (job.priority, job.tags, job.experiment) == (3, ["fox", "snow"], "foxes")
    got = backend.get(job.id)
    assert (got.id, got.account, got.params, got.tags) == (job.id, job.account, job.params, job.tags)
    last = finish(backend, job.id)
    assert (last.status, last.stage, last.step, last.total_steps) == ("done", "done", 2, 2)
    assert set(last.artifacts) == {"video", "thumbnail"}


def test_identical_params_give_the_same_job_unless_forced_and_a_cancelled_one_is_not_reused(backend, hold):
    prompt = unique("a kite")
    first = submit(backend, prompt)
    assert submit(backend, prompt).id == first.id  # in flight: the same job
    forced = submit(backend, prompt, reuse=False)
    other_seed = submit(backend, prompt, seed=2)
    assert len({first.id, forced.id, other_seed.id}) == 3
    assert finish(backend, first.id).status == "done"
    assert submit(backend, prompt).id == first.id  # done: still the same job
    gate, (stopped,) = held(backend, hold, unique("a kite, stopped"))
    backend.cancel(stopped.id)
    assert finish(backend, stopped.id).status == "cancelled"
    again = submit(backend, gate.prompt, seed=0)  # the cancelled job's params exactly
    assert again.id != stopped.id


def test_an_idempotency_key_answers_its_first_job(backend, other):
    key = unique("key").replace(" ", "-")
    first = submit(backend, unique("one"), idempotency_key=key)
    again = submit(backend, unique("two"), idempotency_key=key)
    assert again.id == first.id and again.params == first.params and again.idempotency_key == key
    assert submit(backend, unique("one"), idempotency_key=key + "-2").id != first.id
    theirs = submit(other, unique("one"), idempotency_key=key)  # keys are per account
    assert theirs.id != first.id and theirs.account == other.account


@pytest.mark.parametrize("params, field", [
    ({"model": "sora"}, "model: must be one of"),
    ({"num_frames": 283, "height": 1280, "width": 1280, "num_inference_steps": 200}, "size: 283 frames at 1280x1280"),
])
def test_bad_params_are_refused_naming_the_field_and_nothing_is_queued(backend, params, field):
    before = backend.counts()
    bad = GenerationParams.stored({**tiny(unique("a cat")).to_dict(), **params})  # past the client's own checks
    with pytest.raises(ParamsError, match=field):
        backend.submit(bad, SubmitOptions())
    assert backend.counts() == before and backend.list() == []


def test_the_quota_refuses_the_job_past_it_naming_it_and_queues_nothing(backend, hold, pool_size):
    held(backend, hold, unique("busy"), n=pool_size)
    queued = [submit(backend, unique(f"waiting {i}")).id for i in range(QUOTA - pool_size)]
    assert backend.counts()["queued"] == len(queued)
    with pytest.raises(QuotaExceeded, match=f"max_active_jobs={QUOTA}"):
        submit(backend, unique("one too many"))
    assert len(backend.list(limit=1000)) == QUOTA
    backend.cancel(queued[0])  # a place comes free
    assert submit(backend, unique("now it fits")).status == "queued"


# -- get, list, cancel, delete, counts -----------------------------------------------------------------
def test_get_shows_a_held_jobs_progress_and_unknown_ids_are_JobNotFound(backend, hold):
    _, (job,) = held(backend, hold, unique("a boat"))
    got = backend.get(job.id)
    assert (got.status, got.stage, got.step, got.total_steps) == ("running", "denoising", 1, 2)
    for bad in (UNKNOWN, "../workers/shutdown", "not an id"):
        with pytest.raises(JobNotFound):
            backend.get(bad)


def test_list_filters_by_status_experiment_tag_and_text_newest_first_with_limit_and_offset(
        backend, other, hold, pool_size):
    _, running = held(backend, hold, unique("alpha"), n=pool_size, tags=["t1"], experiment="contract")
    waiting = submit(backend, unique("beta"), tags=["t2"])
    stopped = submit(backend, unique("gamma"), tags=["t1", "t2"])
    assert backend.cancel(stopped.id).status == "cancelled"
    submit(other, unique("alpha beta gamma"), tags=["t1", "t2"], experiment="contract")
    ids = lambda **filters: [r.id for r in backend.list(**filters)]
    newest = [stopped.id, waiting.id, *[j.id for j in reversed(running)]]
    assert ids() == newest
    assert ids(status="running") == newest[2:]
    assert ids(status="queued") == [waiting.id] and ids(status="cancelled") == [stopped.id]
    assert ids(status="done") == []
    assert ids(experiment="contract") == newest[2:] and ids(experiment="nothing") == []
    assert ids(tag="t1") == [stopped.id, *newest[2:]] and ids(tag="t2") == [stopped.id, waiting.id]
    assert ids(text="beta") == [waiting.id] and ids(text="alpha") == newest[2:]
    assert ids(limit=2) == newest[:2] and ids(limit=2, offset=1) == newest[1:3]
    assert ids(offset=len(newest)) == []
    assert ids(tag="t1", status="cancelled", text="gamma") == [stopped.id]


def test_cancel_ends_a_queued_job_at_once_and_a_held_one_at_its_step(backend, hold, pool_size):
    _, busy = held(backend, hold, unique("busy"), n=pool_size)
    queued = submit(backend, unique("queued"))
    assert backend.get(queued.id).status == "queued"
    cancelled = backend.cancel(queued.id)
    assert (cancelled.id, cancelled.status) == (queued.id, "cancelled")
    backend.cancel(busy[0].id)
    last = finish(backend, busy[0].id)
    assert (last.status, last.step) == ("cancelled", 1)
    assert backend.cancel(queued.id).status == "cancelled"  # a finished job stays as it is
    assert [backend.get(j.id).status for j in busy[1:]] == ["running"] * (pool_size - 1)


def test_delete_removes_the_job_and_its_files(backend):
    job = submit(backend, unique("a lighthouse"))
    assert finish(backend, job.id).status == "done"
    path = backend.artifact_path(job.id, "video")
    assert path.is_file()
    backend.delete(job.id)
    assert not path.exists()
    assert backend.list() == []
    for call in (lambda: backend.get(job.id), lambda: backend.delete(job.id),
                 lambda: backend.artifact_path(job.id, "video")):
        with pytest.raises(JobNotFound):
            call()


def test_counts_are_this_accounts_jobs_per_status(backend, other, hold, pool_size):
    assert backend.counts() == dict.fromkeys(STATUSES, 0)
    held(backend, hold, unique("busy"), n=pool_size)
    queued = submit(backend, unique("queued"))
    submit(other, unique("theirs"))
    assert backend.counts() == {**dict.fromkeys(STATUSES, 0), "running": pool_size, "queued": 1}
    backend.cancel(queued.id)
    assert backend.counts() == {**dict.fromkeys(STATUSES, 0), "running": pool_size, "cancelled": 1}
    assert other.counts() == {**dict.fromkeys(STATUSES, 0), "queued": 1}


def test_the_queue_shows_this_accounts_jobs_whole_and_others_by_place_only(backend, other, hold, pool_size):
    _, busy = held(backend, hold, unique("busy"), n=pool_size)
    mine = submit(backend, unique("my queued fox"))
    secret = unique("their secret plan")
    theirs = submit(other, secret)
    rows = backend.queue(limit=1000)
    assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))
    assert not {j.id for j in busy} & {r["id"] for r in rows}  # running jobs are not queued
    (own,) = [r for r in rows if r["id"] == mine.id]
    assert own["mine"] and own["account"] == backend.account and own["prompt"] == mine.params["prompt"]
    (place,) = [r["position"] for r in other.queue(limit=1000) if r["id"] == theirs.id]
    seen = rows[place - 1]  # the same place for every viewer
    assert not seen["mine"] and (seen["id"], seen["account"], seen["prompt"]) == (None, None, None)
    assert (seen["model"], seen["width"], seen["height"], seen["num_frames"], seen["steps"]) == \
        ("tiny", 32, 32, 7, 2)
    assert theirs.id not in json.dumps(rows) and secret not in json.dumps(rows)


# -- progress -------------------------------------------------------------------------------------------
def test_watch_shows_a_held_job_where_it_is_then_follows_it_to_the_end(backend, hold):
    gate, (job,) = held(backend, hold, unique("a slow river"))
    states = backend.watch(job.id, timeout=120)
    first = next(states)
    assert (first.id, first.status, first.stage, first.step) == (job.id, "running", "denoising", 1)
    with pytest.raises(TimeoutError, match="still running"):
        list(backend.watch(job.id, timeout=0.3))
    gate.release()
    rest = list(states)
    assert rest[-1].status == "done" and rest[-1].step == 2 and rest[-1].artifacts
    assert not any(r.finished for r in rest[:-1])
    steps = [first.step, *(r.step for r in rest)]
    assert steps == sorted(steps)


def test_one_follower_serves_every_view_of_a_job_and_a_wait_ends_them(backend, hold, tmp_path, monkeypatch):
    """Two handles of one job, a live view and a card: one follower reads it for both (the same step), and a
    blocking wait's states, pushed by a gateway or polled in this process, end both views without reads
    of their own."""
    from mochi_lab.client.job import Job
    from mochi_lab.display.live import LiveView
    from mochi_lab.display.progress import progress_view
    from mochi_lab.display.widgets.job_card import JobCard

    monkeypatch.chdir(tmp_path)
    gate, (record,) = held(backend, hold, unique("a shared look"))
    job, again = Job(backend, record), MochiCluster(backend=backend).job(record.id)
    shown: list[str] = []
    view = LiveView(job, publish=lambda bundle, update: shown.append(bundle["text/html"]), folder=tmp_path / "v")
    view.start()
    card = JobCard(again, download_dir=tmp_path / "cards")
    assert card.follower is view.follower
    reads = view.follower.reads
    assert card.poll() and view.follower.reads == reads + 1
    assert (card.record.step, view.record.step) == (1, 1) and "denoising 1/2" in shown[-1]
    assert card.bar.value == (progress_view(view.record)["fraction"] or 0) and "denoising 1/2" in card.stage.value
    gate.release()
    reads = view.follower.reads
    assert job.wait(timeout=120).status == "done" and view.follower.reads == reads
    assert again.record.status == "done" and card.video is not None and ">done<" in shown[-1]


def test_a_rerun_queues_the_same_params_as_a_new_job_and_reproduce_is_it(backend, other):
    from mochi_lab.client.job import Job

    first = submit(backend, unique("a rerun"))
    again = backend.rerun(first.id)
    assert again.id != first.id and again.params == first.params and again.tags == [f"reproduces:{first.id}"]
    job = Job(backend, first).reproduce(priority=2)
    assert job.id not in (first.id, again.id) and job.params.to_dict() == first.params
    assert (job.record.priority, job.record.tags) == (2, [f"reproduces:{first.id}"])
    with pytest.raises(JobNotFound):
        other.rerun(first.id)


def test_a_preview_shows_after_a_preview_step_and_stays_after_a_cancel(backend, hold):
    early_gate, (early,) = held(backend, hold, unique("before any step"), step=0)
    _, (job,) = held(backend, hold, unique("a preview"), step=1)
    assert backend.preview(early.id) is None  # step 0: nothing to show yet
    step, webp = backend.preview(job.id)
    strip = Image.open(io.BytesIO(webp))
    assert step == 1 and strip.format == "WEBP" and strip.size == (4, 4)  # a latent frame of 32x32 is 4x4
    assert MochiCluster(backend=backend).job(job.id).preview == webp
    backend.cancel(job.id)
    assert finish(backend, job.id).status == "cancelled"
    assert backend.preview(job.id) == (step, webp)  # its last look stays
    early_gate.release()
    assert finish(backend, early.id).status == "done"
    assert backend.preview(early.id) is None  # done: the video replaced the preview


# -- artifacts ------------------------------------------------------------------------------------------
def test_a_done_jobs_video_and_thumbnail_read_and_save(backend, tmp_path):
    job = submit(backend, unique("a cat surfing a wave"), seed=3)
    assert finish(backend, job.id).status == "done"
    path = backend.artifact_path(job.id, "video")
    info = probe(path)
    assert (info.frames, info.height, info.width, info.fps, info.codec) == (7, 32, 32, 8.0, "h264")
    assert read_frames(path).shape == (7, 32, 32, 3)
    assert backend.artifact(job.id, "video") == path.read_bytes()
    thumbnail = backend.artifact(job.id, "thumbnail")
    assert thumbnail[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(thumbnail)).size == (32, 32)
    saved = backend.save_artifact(job.id, "video", tmp_path / "saved.mp4")
    assert saved == tmp_path / "saved.mp4" and saved.read_bytes() == path.read_bytes()
    assert backend.save_artifact(job.id, "thumbnail", tmp_path / "t.png").read_bytes() == thumbnail


def test_an_unfinished_jobs_artifacts_are_FileNotFoundError_and_a_bad_name_ValueError(backend, hold):
    _, (job,) = held(backend, hold, unique("not yet"))
    with pytest.raises(FileNotFoundError, match="has no video .status running"):
        backend.artifact_path(job.id, "video")
    with pytest.raises(FileNotFoundError, match="has no thumbnail"):
        backend.artifact(job.id, "thumbnail")
    with pytest.raises(ValueError, match="artifact must be one of video, thumbnail"):
        backend.artifact_path(job.id, "weights")
    assert MochiCluster(backend=backend).job(job.id).thumbnail is None


# -- another account ------------------------------------------------------------------------------------
def test_another_accounts_ids_are_not_found_exactly_like_unknown_ones(backend, other, hold, tmp_path):
    done = submit(other, unique("their finished fox"))
    assert finish(other, done.id).status == "done"
    _, (running,) = held(other, hold, unique("their running fox"))
    calls = {
        "get": lambda i: backend.get(i), "cancel": lambda i: backend.cancel(i), "delete": lambda i: backend.delete(i),
        "preview": lambda i: backend.preview(i), "watch": lambda i: list(backend.watch(i, timeout=30)),
        "artifact_path": lambda i: backend.artifact_path(i, "video"), "artifact": lambda i: backend.artifact(i, "thumbnail"),
        "save_artifact": lambda i: backend.save_artifact(i, "video", tmp_path / "x.mp4"),
    }
    for name, call in calls.items():
        answers = {}
        for job_id in (done.id, running.id, UNKNOWN):
            with pytest.raises(JobNotFound) as exc:
                call(job_id)
            answers[job_id] = str(exc.value).replace(job_id, "<id>")
        assert len(set(answers.values())) == 1, (name, answers)
    assert not (tmp_path / "x.mp4").exists()
    assert backend.list() == [] and backend.counts() == dict.fromkeys(STATUSES, 0)
    # untouched: still theirs, still running and done
    assert other.get(running.id).status == "running" and other.get(done.id).status == "done"
    assert other.artifact(done.id, "thumbnail")[:8] == b"\x89PNG\r\n\x1a\n"


# -- LoRA adapters --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> bytes:
    return make_adapter(tmp_path_factory.mktemp("lora") / "a.safetensors", seed=7).read_bytes()


def test_an_adapter_is_uploaded_listed_used_and_deleted_and_another_account_finds_none(backend, other, adapter):
    name = f"style-{uuid.uuid4().hex[:8]}"
    record = backend.put_adapter(name, io.BytesIO(adapter))
    assert (record["name"], record["model"], record["bytes"], record["rank"]) == (name, "tiny", len(adapter), 4)
    assert [r for r in backend.adapters() if r["name"] == name] == [record]
    prompt = unique("a styled fox")
    styled = backend.submit(tiny(prompt, lora=[(name, 0.9)]), SubmitOptions.parse())
    base = submit(backend, prompt)
    assert styled.params["lora"] == [{"name": name, "scale": 0.9, "sha256": record["sha256"]}]
    styled, base = finish(backend, styled.id), finish(backend, base.id)
    assert (styled.status, base.status) == ("done", "done")
    assert styled.meta["lora"] == [{"name": name, "sha256": record["sha256"], "scale": 0.9,
                                    "load_s": styled.meta["lora_load_s"]}]
    assert backend.artifact(styled.id, "video") != backend.artifact(base.id, "video")

    assert name not in [r["name"] for r in other.adapters()]
    with pytest.raises(ParamsError, match=f"lora: no adapter named '{name}' in account "):
        other.submit(tiny(prompt, lora=name), SubmitOptions.parse())
    answers = set()
    for missing in (name, "never-uploaded", "../escape"):
        with pytest.raises(AdapterNotFound) as exc:
            other.delete_adapter(missing)
        answers.add(str(exc.value).replace(repr(missing), "<name>"))
    assert answers == {"adapter <name> not found"}
    backend.delete_adapter(name)
    assert name not in [r["name"] for r in backend.adapters()]
    with pytest.raises(AdapterNotFound):
        backend.delete_adapter(name)


@pytest.mark.parametrize("case", ["a pickle", "truncated", "a header that lies", "keys of no module",
                                  "a rank over the cap", "a path in the name"])
def test_a_refused_upload_is_AdapterRejected_naming_why_and_keeps_nothing(backend, adapter, case):
    data, name, reason = {
        "a pickle": (pickle.dumps({"w": [1.0]}, protocol=4), "p", "is a pickle"),
        "truncated": (adapter[:-10], "t", "past the end"),
        "a header that lies": (lie(adapter, shape=[2**31, 2**31]), "l", "the header lies"),
        "keys of no module": (renamed(adapter, "attn1.to_q", "attn9.to_q"), "k", "match no LoRA-targetable module"),
        "a rank over the cap": (with_rank(adapter, 257), "r", "rank 257; this cluster accepts ranks 1..256"),
        "a path in the name": (adapter, "../x", "an adapter name is 1-64 letters"),
    }[case]
    before = backend.adapters()
    with pytest.raises(AdapterRejected) as exc:
        backend.put_adapter(name, io.BytesIO(data))
    assert reason in str(exc.value)
    assert backend.adapters() == before


# -- the pool -------------------------------------------------------------------------------------------
def test_models_and_a_ready_pool(backend):
    assert backend.models() == sorted(known_models()) and "tiny" in backend.models()
    backend.wait_ready(60)


def test_workers_show_this_accounts_job_and_another_accounts_only_as_busy(backend, other, hold):
    _, (job,) = held(backend, hold, unique("a busy worker"))
    mine = [w for w in backend.workers() if w["current_job"] == job.id]
    assert len(mine) == 1 and mine[0]["mine"] is True and mine[0]["state"] == "busy"
    rows = other.workers()
    assert job.id not in json.dumps(rows)
    (busy,) = [w for w in rows if w["worker_id"] == mine[0]["worker_id"]]
    assert (busy["state"], busy["current_job"], busy["mine"]) == ("busy", None, False)
    for w in [*rows, *backend.workers()]:  # nodes, pids, memory and errors are an admin's
        assert set(w) <= {*WORKER_FIELDS, "current_job", "mine"}, set(w) - {*WORKER_FIELDS}


# -- experiments ----------------------------------------------------------------------------------------
def _record(name: str, account: str, **over) -> dict:
    return {"name": name, "account": account, "description": "two seeds", "tags": ["demo"], "created_at": 1.0,
            "updated_at": 2.0, "runs": [], **over}


def test_experiments_are_put_read_and_listed_per_account(backend, other):
    name = unique("exp").replace(" ", "-")
    with pytest.raises(KeyError):
        backend.get_experiment(name)
    backend.put_experiment(_record(name, backend.account))
    assert backend.get_experiment(name) == _record(name, backend.account)
    backend.put_experiment(_record(name, backend.account, description="replaced", updated_at=3.0))
    assert backend.get_experiment(name)["description"] == "replaced"
    assert name in [e["name"] for e in backend.list_experiments()]
    with pytest.raises(KeyError):
        other.get_experiment(name)
    assert name not in [e["name"] for e in other.list_experiments()]


def test_an_experiment_sweeps_waits_and_tabulates_through_the_backend(backend, other):
    name = unique("fox").replace(" ", "-")
    exp = Experiment.open(backend, name, description="two prompts", tags=["demo"])
    jobs = exp.sweep([unique("a fox"), unique("a dog")], seeds=[1], **TINY)
    assert len(jobs) == 2 and {j.record.experiment for j in jobs} == {name}
    assert [j.id for j in exp.sweep([jobs[0].params.prompt, jobs[1].params.prompt], seeds=[1], **TINY)] == \
        [j.id for j in jobs]  # the same sweep again: the same jobs
    assert exp.wait(120, progress=False)["done"] == 2
    df = exp.to_dataframe()
    assert len(df) == 2 and set(df["status"]) == {"done"}
    assert Experiment.open(backend, name, create=False).description == "two prompts"
    with pytest.raises(KeyError):
        Experiment.open(other, name, create=False)


# -- the handle -----------------------------------------------------------------------------------------
def test_info_names_the_backend_and_the_account_and_no_secret(backend, kind, request):
    info = backend.info()
    assert (info["backend"], info["account"], info["model"]) == (kind, backend.account, "tiny")
    cluster = MochiCluster(backend=backend)
    assert cluster.account == backend.account and kind in repr(cluster)
    if kind == "gateway":
        token = request.getfixturevalue("tokens")[backend.account]
        for text in (str(info), repr(backend), repr(cluster), cluster._repr_html_()):
            assert token not in text


# -- an unreachable store -------------------------------------------------------------------------------
@pytest.fixture
def unreachable(kind, tmp_path, request):
    """A backend of this kind whose store does not answer (a Redis URL where nothing listens): through the
    gateway, the real app over that store, its callers still known to the hub."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store
    from tests.support.hub_fixtures import start_gateway
    from tests.support.ports import free_port

    settings = Settings(data_dir=tmp_path / "data", account="ann")
    shared = DirectBackend(settings, open_store(f"redis://127.0.0.1:{free_port()}/0"), None, admin=False)
    if kind == "direct":
        yield shared
        shared.close()
        return
    from mochi_lab.client.http import GatewayBackend

    gw = start_gateway(request.getfixturevalue("hub"), shared)
    backend = GatewayBackend(gw.url, request.getfixturevalue("tokens")["gwen"], cache_dir=tmp_path / "downloads")
    yield backend
    backend.close()
    gw.stop()
    shared.close()


def test_an_unreachable_store_is_StoreUnavailable(unreachable):
    for call in (unreachable.counts, lambda: unreachable.get(UNKNOWN), lambda: unreachable.list(),
                 lambda: submit(unreachable, "a cat"), lambda: unreachable.get_experiment("e"),
                 lambda: unreachable.queue()):
        with pytest.raises(StoreUnavailable):
            call()
