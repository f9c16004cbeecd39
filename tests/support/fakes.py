"""Stand-ins for the public `Job` and `MochiCluster` handles, for pure rendering tests (no Ray, no store).

The widgets use only the public handle, by duck typing; these fakes implement just that surface and
count every read, so tests can assert that a closed widget reads nothing more.
"""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mochi_lab import JobNotFound
from mochi_lab.client.backend import queue_rows
from mochi_lab.display.reprs import video_widget
from mochi_lab.model import JobRecord

# Markup in every position: an element, a double- and a single-quoted attribute break-out, and all three.
MARKUP = "<img src=x onerror=alert(1)>"
DOUBLE = 'x" onmouseover="alert(1)'
SINGLE = "x' onmouseover='alert(1)"
ALL = "<svg onload=alert(3)>\"'&amp;"
PAYLOADS = [MARKUP, DOUBLE, SINGLE, ALL]

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
MP4 = b"\0\0\0\x18ftypisom" + b"\0" * 32

PARAMS = {"prompt": "a red ball", "negative_prompt": "", "num_frames": 7, "height": 32, "width": 32,
          "num_inference_steps": 2, "guidance_scale": 4.5, "seed": 1, "fps": 8, "model": "tiny"}
TIMINGS = {"queue_s": 0.1, "load_s": 0.0, "denoise_s": 1.0, "decode_s": 0.2, "encode_s": 0.1, "run_s": 1.4}


def record(**fields: Any) -> JobRecord:
    """A plausible running job, with `fields` replaced (params, timings, meta and artifacts merge)."""
    base: dict[str, Any] = dict(
        id="j-1", account="alice", params=dict(PARAMS), status="running", stage="denoising", step=1,
        total_steps=2, attempts=1, created_at=1.7e9, worker_id="w-1", timings=dict(TIMINGS),
        meta={"worker_id": "w-1"}, artifacts={"video": "/data/j-1.mp4", "thumbnail": "/data/j-1.png"},
    )
    for key in ("params", "timings", "meta", "artifacts"):
        if isinstance(fields.get(key), dict):
            fields[key] = {**base[key], **fields[key]}
    base.update(fields)
    return JobRecord(**base)


def hostile_record(payload: Any, **fields: Any) -> JobRecord:
    """A record whose every field holds `payload`, numbers and the status included (the store is a trust boundary)."""
    names = {f.name for f in dataclasses.fields(JobRecord)}
    data: dict[str, Any] = {name: payload for name in names}
    data.update(params={k: payload for k in PARAMS}, timings={k: payload for k in TIMINGS},
                meta={"worker_id": payload}, artifacts={"video": payload, "thumbnail": payload}, tags=[payload, payload])
    data.update(fields)
    return JobRecord(**data)


class FakeJob:
    """The public Job surface the widgets use. `refreshes` counts live reads."""

    def __init__(self, rec: JobRecord, *, video: bytes | None = MP4, thumbnail: bytes | None = PNG,
                 history: list[JobRecord] | None = None):
        self._record = rec
        self._history = list(history or [])  # records that successive refresh() calls return
        self._video, self._thumbnail = video, thumbnail
        self.position: dict[str, Any] | None = None  # what queue_position() answers while queued
        self.preview: bytes | None = None  # the latest preview's WebP, as Job.preview gives it
        self.refreshes = 0
        self.cancels = 0
        self.deleted = False

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def record(self) -> JobRecord:
        return self._record

    @property
    def status(self) -> str:
        return self.refresh().status

    def refresh(self) -> JobRecord:
        self.refreshes += 1
        if self.deleted:
            raise JobNotFound(self.id)
        if self._history:
            self._record = self._history.pop(0)
        return self._record

    def queue_position(self) -> dict[str, Any] | None:
        return self.position if self.refresh().status == "queued" else None

    @property
    def follower(self):
        """The one follower of this handle, as `Job.follower` (it reads through `refresh` and counts there)."""
        from mochi_lab.client.follow import follower_of

        return follower_of(self)

    def cancel(self, timeout: float = 0) -> str:
        self.cancels += 1
        self._record = dataclasses.replace(self._record, status="cancelled", stage="cancelled")
        return self._record.status

    def reproduce(self) -> "FakeJob":
        return FakeJob(dataclasses.replace(self._record, id=f"{self.id}-again", status="queued", stage="queued"))

    @property
    def video(self):
        if self._record.status != "done" or self._video is None:
            raise RuntimeError(f"job {self.id} is {self._record.status}")
        p = self._record.params
        return video_widget(self._video, p.get("width"), p.get("height"))

    @property
    def thumbnail(self) -> bytes | None:
        return self._thumbnail if self._record.status == "done" else None

    def save(self, path: str | Path) -> Path:
        if self._record.status != "done" or self._video is None:
            raise RuntimeError(f"job {self.id} is {self._record.status}")
        dest = Path(path)
        if dest.is_dir():
            dest = dest / f"{self.id}.mp4".replace("/", "_")
        dest.write_bytes(self._video)
        return dest


class FakeCluster:
    """The public MochiCluster surface the widgets use. `reads` counts store reads by method."""

    def __init__(self, *, jobs: list[FakeJob] = (), workers: list[Any] = (), counts: Any = None,
                 experiments: list[str] = (), fail: Exception | None = None, model: str = "tiny",
                 models: list[str] = ("tiny",), queue: list[Any] | None = None,
                 dashboard: str | None = None):
        self.model = model
        self._dashboard = dashboard
        self._models = list(models)
        self._jobs = list(jobs)
        self._workers = list(workers)
        self._queue = queue  # queue rows as given; by default the queued jobs, in order, as an admin sees them
        self._counts = counts if counts is not None else {"queued": 0, "running": 0, "done": 0, "failed": 0,
                                                          "cancelled": 0}
        self._experiments = [SimpleNamespace(name=n) for n in experiments]
        self.fail = fail  # raised by every read and write when set
        self.reads: dict[str, int] = {}
        self.generated: list[FakeJob] = []
        self.next_job: FakeJob | None = None

    def _read(self, name: str) -> None:
        self.reads[name] = self.reads.get(name, 0) + 1
        if self.fail is not None:
            raise self.fail

    def models(self) -> list[str]:
        self._read("models")
        return list(self._models)

    def dashboard_url(self) -> str | None:
        return self._dashboard

    def workers(self) -> list[Any]:
        self._read("workers")
        return list(self._workers)

    def queue(self, limit: int = 50) -> list[Any]:
        self._read("queue")
        if self._queue is not None:
            return self._queue[:limit]
        return queue_rows([j.record for j in self._jobs if j.record.status == "queued"], "alice", admin=True)[:limit]

    def counts(self) -> Any:
        self._read("counts")
        return self._counts

    def jobs(self, status=None, experiment=None, text=None, tag=None, limit=50, offset=0) -> list[FakeJob]:
        self._read("jobs")
        return self._jobs[offset: offset + limit]

    def experiments(self) -> list[Any]:
        self._read("experiments")
        return list(self._experiments)

    def delete(self, job_id: str) -> None:
        self._read("delete")
        self._jobs = [j for j in self._jobs if j.id != job_id]

    def scale(self, n: int) -> None:
        self._read("scale")

    def generate(self, prompt: str, **params: Any) -> FakeJob:
        self._read("generate")
        job = self.next_job or FakeJob(record(id=f"g-{len(self.generated)}", status="queued", stage="queued",
                                              attempts=0, timings={}, params={**params, "prompt": prompt}))
        self.generated.append(job)
        return job


class Scan(HTMLParser):
    """Every element, attribute and piece of text of an HTML fragment, as a browser's parser sees them."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.texts: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.texts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


# What our templates emit; anything else (script, an on* handler) came from data. A finished job's static
# view has a <video> (or an <img> thumbnail) whose src/poster are URIs mochi_lab.display.reprs built, never stored text.
ALLOWED_TAGS = {"div", "span", "b", "i", "code", "br", "pre", "details", "summary", "progress", "table", "thead",
                "tbody", "tr", "th", "td", "a", "video", "img"}
ALLOWED_ATTRS = {"class", "style", "title", "href", "download", "value", "max", "colspan", "src", "poster", "controls",
                 "autoplay", "loop", "muted", "playsinline", "preload", "alt", "width"}
# the only values those URI attributes may hold: a relative link, or a data: image
SAFE_URI = ("./", "data:image/jpeg;base64,", "data:image/png;base64,")


def assert_safe(html: str, payload: str | None = None, *, shown: bool = True) -> Scan:
    """No markup from data in `html`: only our elements and attributes, and `payload` only as text.

    With `shown`, the payload must also reach the page (escaped), so a view that silently dropped a
    field cannot pass for one that escapes it.
    """
    scan = Scan(html)
    assert set(scan.tags) <= ALLOWED_TAGS, f"foreign elements {set(scan.tags) - ALLOWED_TAGS} in {html}"
    names = {name for name, _ in scan.attrs}
    assert names <= ALLOWED_ATTRS, f"foreign attributes {names - ALLOWED_ATTRS} in {html}"
    for name, value in scan.attrs:
        if name in ("src", "poster"):
            assert (value or "").startswith(SAFE_URI), f"{name}={value!r} is not a URI mochi_lab built, in {html}"
    # markup, or a quote that closed an attribute (as text, "onerror=alert" is harmless and expected)
    for needle in ("<img", "<script", "<svg", 'onmouseover="', "onmouseover='", '" onmouseover', "' onmouseover"):
        assert needle not in html, f"{needle!r} reached the page raw: {html}"
    if payload is not None and shown:
        values = [v or "" for _, v in scan.attrs]
        assert payload in scan.text or any(payload in v for v in values), f"{payload!r} not shown in {html}"
        if "<" in payload:
            assert "&lt;" in html
    return scan


class QueueBackend:
    """Just what `Job.queue_position` reads: the cluster's queue (in the order given, as alice sees it), this
    account's done and running jobs, and the worker rows."""

    def __init__(self, queued: list[JobRecord], done: list[JobRecord], workers: list[Any],
                 running: list[JobRecord] = ()):
        self.queued, self.done_jobs, self.rows, self.running = list(queued), list(done), list(workers), list(running)
        self.reads: dict[str, int] = {}

    def _read(self, name: str) -> None:
        self.reads[name] = self.reads.get(name, 0) + 1

    def get(self, job_id):
        self._read("get")
        return next(r for r in self.queued + self.running if r.id == job_id)

    def queue(self, limit=50):
        self._read("queue")
        return queue_rows(self.queued, "alice", admin=False)[:limit]

    def list(self, *, status=None, limit=50, **_):
        self._read(f"list {status}")
        return list({"done": self.done_jobs, "running": self.running}[status])[:limit]

    def workers(self):
        self._read("workers")
        return list(self.rows)
