"""The gateway client (`mochi_lab.client.http.GatewayBackend`) where it differs from the direct backend: choosing
it, its token, its artifact cache, its paging, the pushed event stream and reconnects, and how it maps the
server's answers to exceptions. Always against the real gateway app and the real JupyterHub (what both
backends share is tests/client/backend's contract suite).

`gateway` is the session's gateway over the session's pool; `idle` is one over a store of its own with no
pool (its jobs stay queued), mounted under the hub's service prefix as a hub proxies it. `Wire` is the
client's real transport, recording what it sends; it can also break a connection as a network would.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import httpx
import pytest

from mochi_lab import JobNotFound, MochiCluster, ParamsError, StoreUnavailable
from mochi_lab.client.http import GatewayAuthError, GatewayBackend, GatewayError
from tests.support.backends import finish, held, unique
from tests.support.hub_fixtures import USERS, start_gateway
from tests.support.jobkit import TINY
from tests.support.ports import free_port

PREFIX = "/services/mochi-lab/"


class Wire(httpx.BaseTransport):
    """httpx's own transport, noting each request ("METHOD /path"); `short_downloads` downloads end after
    100 bytes of a longer body, and `cut_streams` event streams break after their first event, as a broken
    connection would. `on_stream(n)` runs as the n-th event stream opens."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport(retries=1)
        self.sent: list[str] = []
        self.urls: list[httpx.URL] = []
        self.bodies: list[bytes] = []
        self.short_downloads = self.cut_streams = self.streams = 0
        self.on_stream: Callable[[int], None] = lambda n: None

    def count(self, what: str) -> int:
        return self.sent.count(what)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(f"{request.method} {request.url.path}")
        self.urls.append(request.url)
        self.bodies.append(request.read())
        if "/events/" in request.url.path:
            self.streams += 1
            self.on_stream(self.streams)
        response = self.inner.handle_request(request)
        if "/download/" in request.url.path and response.status_code == 200 and self.short_downloads:
            self.short_downloads -= 1
            body = response.read()
            response.close()
            return httpx.Response(200, headers=response.headers, content=body[:100])  # its Content-Length stays
        if "/events/" in request.url.path and response.status_code == 200 and self.cut_streams:
            self.cut_streams -= 1
            return httpx.Response(200, headers=response.headers, stream=_FirstEventOnly(response))
        return response

    def close(self) -> None:
        self.inner.close()


class _FirstEventOnly(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __iter__(self):
        seen = b""
        for chunk in self.response.stream:
            yield chunk
            seen += chunk
            if b"\n\n" in seen:
                raise httpx.ReadError("connection reset by peer")

    def close(self) -> None:
        self.response.close()


@pytest.fixture(scope="module")
def idle(hub, tmp_path_factory):
    """The real gateway under the hub's service prefix, over a store of its own and no pool."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("idle-gateway"), account="alice")
    store = open_store(settings.store_url)
    gw = start_gateway(hub, DirectBackend(settings, store, None), prefix=PREFIX)
    gw.url += PREFIX
    gw.store = store
    yield gw
    gw.stop()
    store.close()


@pytest.fixture
def idle_store(idle):
    """The idle gateway's store, with no job or worker left from this test."""
    yield idle.store
    for account in USERS:
        for record in idle.store.list(account, limit=10_000):
            idle.store.delete(account, record.id)
    for row in idle.store.workers():
        idle.store.remove_worker(row["worker_id"])


@pytest.fixture
def connect(tmp_path):
    """connect(url, token, wire=None, **kw) -> GatewayBackend, closed at the end; artifacts cached in tmp_path."""
    opened = []

    def connect(url: str, token: str, wire: Wire | None = None, **kw) -> GatewayBackend:
        kw.setdefault("cache_dir", tmp_path / "cache")
        backend = GatewayBackend(url, token, transport=wire, **kw)
        opened.append(backend)
        return backend

    yield connect
    for backend in opened:
        backend.close()


# -- choosing the backend --------------------------------------------------------------------------------
def test_an_http_address_or_MOCHI_LAB_GATEWAY_chooses_the_gateway_and_the_hub_names_the_account(
        idle, tokens, monkeypatch, tmp_path):
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", tokens["bob"])
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")  # what the process claims changes nothing
    port = idle.url.split(":")[2].split("/")[0]
    with MochiCluster(idle.url, account="alice") as c:
        assert c.account == "bob" and c.backend.info()["backend"] == "gateway"
        assert c.backend.cache_dir == tmp_path / "gateway" / f"127.0.0.1_{port}_services_mochi-lab" / "bob"
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", idle.url)
    with MochiCluster() as c:
        assert isinstance(c.backend, GatewayBackend) and c.account == "bob"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", tokens["alice"])
    with MochiCluster() as c:
        assert c.account == "alice"


def test_the_embedded_default_stays_direct(monkeypatch):
    from mochi_lab.client.direct import DirectBackend

    started = []

    def fake_start(settings, model, pipeline, *, start_pool, **_):
        started.append(settings)
        raise RuntimeError("direct")

    monkeypatch.setattr(DirectBackend, "start", staticmethod(fake_start))
    monkeypatch.delenv("MOCHI_LAB_GATEWAY", raising=False)
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster()
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", "http://127.0.0.1:9/")  # an operator's explicit store keeps the direct backend
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster("ray://127.0.0.1:10001")
    assert len(started) == 3


def test_no_token_is_a_clear_permission_error(monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(PermissionError, match="JUPYTERHUB_API_TOKEN"):
        MochiCluster("http://127.0.0.1:9/")


# -- requests, the artifact cache and paging --------------------------------------------------------------
def test_submit_sends_every_option_and_the_video_is_downloaded_once(gateway, tokens, connect, tmp_path):
    wire = Wire()
    bob = MochiCluster(backend=connect(gateway.url, tokens["bob"], wire))
    assert wire.sent[:2] == ["GET /whoami", "GET /models"]
    prompt = unique("a red fox")
    job = bob.generate(prompt, seed=1, tags=["t"], priority=3, **TINY)
    body = json.loads(wire.bodies[wire.sent.index("POST /generate")])
    assert body["params"]["prompt"] == prompt and body["params"]["seed"] == 1
    assert (body["priority"], body["tags"], body["experiment"], body["idempotency_key"], body["reuse"]) == \
        (3, ["t"], None, None, True)
    path = job.result(timeout=120)
    assert path.parent == tmp_path / "cache" / f"127.0.0.1_{gateway.url.rsplit(':', 1)[1]}" / "bob"
    assert job.result() == path and job.video.value == path.read_bytes()  # the cache: no second download
    assert wire.count(f"GET /download/{job.id}") == 1
    assert job.video.format == "mp4" and job.thumbnail[:8] == b"\x89PNG\r\n\x1a\n"
    assert job.save(tmp_path / "out").read_bytes() == path.read_bytes()
    assert bob.generate(prompt, seed=1, force=True, **TINY).id != job.id
    assert json.loads(wire.bodies[-1])["reuse"] is False


def test_list_pages_past_the_servers_cap(idle, idle_store, tokens, connect, monkeypatch):
    import mochi_lab.client.http

    monkeypatch.setattr(mochi_lab.client.http, "_PAGE", 2)  # the server's cap, as the client knows it
    wire = Wire()
    bob = MochiCluster(backend=connect(idle.url, tokens["bob"], wire))
    ids = [bob.generate(unique(f"page {i}"), **TINY).id for i in range(5)]
    assert [j.id for j in bob.jobs(limit=100)] == ids[::-1]
    pages = [(u.params["limit"], u.params["offset"]) for u in wire.urls if u.path.endswith("/jobs/bob")]
    assert pages == [("2", "0"), ("2", "2"), ("2", "4")]
    assert [j.id for j in bob.jobs(limit=3, offset=1)] == ids[::-1][1:4]


def test_save_artifact_streams_to_the_destination_without_the_cache(gateway, tokens, connect, tmp_path):
    bob = MochiCluster(backend=connect(gateway.url, tokens["bob"]))
    job = bob.generate(unique("a cat"), **TINY)
    assert job.wait(120).status == "done"
    dest = bob.backend.save_artifact(job.id, "video", tmp_path / "one.mp4")
    assert dest.read_bytes()[4:8] == b"ftyp"
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["one.mp4"]  # no .part file left
    assert job.save(tmp_path / "two.mp4").read_bytes() == dest.read_bytes()  # result() first: through the cache
    assert (tmp_path / "cache").exists()


def test_delete_removes_the_cached_files(gateway, tokens, connect):
    bob = MochiCluster(backend=connect(gateway.url, tokens["bob"]))
    job = bob.generate(unique("keep me"), **TINY)
    path = job.result(120)
    bob.delete(job.id)
    assert not path.exists()
    with pytest.raises(JobNotFound):
        bob.job(job.id)


def test_a_malformed_id_is_not_found_and_nothing_is_sent(idle, tokens, connect):
    wire = Wire()
    bob = MochiCluster(backend=connect(idle.url, tokens["bob"], wire))
    before = len(wire.sent)
    for bad in ("../workers/shutdown", "18c0c0c0c0c-0123456789ab/../../counts", ""):
        with pytest.raises(JobNotFound):
            bob.job(bad)
        with pytest.raises(JobNotFound):
            bob.backend.artifact_path(bad, "video")
    assert len(wire.sent) == before


def test_a_cut_short_download_leaves_nothing_behind(gateway, tokens, connect, tmp_path):
    wire = Wire()
    bob = MochiCluster(backend=connect(gateway.url, tokens["bob"], wire))
    job = bob.generate(unique("short"), **TINY)
    assert job.wait(120).status == "done"
    wire.short_downloads = 1
    with pytest.raises(StoreUnavailable, match="cut short .100 of"):
        job.result()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert job.result().read_bytes()[4:8] == b"ftyp"


# -- the pushed event stream ----------------------------------------------------------------------------
def test_events_of_a_finished_job_are_one(gateway, tokens, connect):
    bob = connect(gateway.url, tokens["bob"])
    job = MochiCluster(backend=bob).generate(unique("events"), **TINY)
    assert finish(bob, job.id).status == "done"
    assert [(r.id, r.status) for r in bob.events(job.id)] == [(job.id, "done")]


def test_wait_follows_the_pushed_stream_across_cuts(gateway, tokens, connect, hold):
    wire = Wire()
    bob = connect(gateway.url, tokens["bob"], wire)
    gate, (record,) = held(bob, hold, unique("a cut stream"))
    wire.cut_streams = 2  # the first two streams break after their first event (the job, held at step 1)
    wire.on_stream = lambda n: gate.release() if n == 3 else None  # the third one sees it run to the end
    job = MochiCluster(backend=bob).job(record.id)
    assert job.wait(timeout=120).status == "done" and job.record.step == 2
    assert wire.cut_streams == 0 and wire.count(f"GET /events/{job.id}") == 3, wire.sent
    assert wire.count(f"GET /status/{job.id}") == 1 + 2, "the handle's read, then one state read per cut: no polling"


def test_wait_times_out_on_the_stream_within_its_time(idle, idle_store, tokens, connect):
    bob = MochiCluster(backend=connect(idle.url, tokens["bob"]))
    job = bob.generate(unique("queued forever"), **TINY)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still queued"):  # waits on the pushed stream, not past its time
        job.wait(timeout=0.5)
    # the stream itself lasts hours (events_max_s): a wait that ignored its time would still be here
    assert 0.5 <= time.monotonic() - t0 < 60


# -- errors ----------------------------------------------------------------------------------------------
def test_what_the_server_refuses_is_ParamsError_in_its_words(idle, idle_store, tokens, connect):
    from mochi_lab import GenerationParams
    from mochi_lab.params import SubmitOptions

    bob = connect(idle.url, tokens["bob"])
    stored = GenerationParams.stored({"prompt": "x", "seed": 1, **TINY, "num_frames": 8})  # skips the client's checks
    with pytest.raises(ParamsError, match="num_frames: .*6k.1 .*got 8; nearest valid values are 7 or 13"):
        bob.submit(stored, SubmitOptions.parse())
    assert bob.counts()["queued"] == 0


def test_401_and_403_are_PermissionErrors_without_the_token(idle, hub, tokens, connect, mochi, gateway):
    with pytest.raises(GatewayAuthError, match="refused the token .401") as exc:
        connect(idle.url, "tok-wrong-0000000000000000")
    assert isinstance(exc.value, PermissionError) and exc.value.status == 401
    assert "tok-wrong" not in str(exc.value) and "tok-wrong" not in repr(exc.value)
    unscoped = hub.token("alice", scopes=["read:users:name!user"])
    with pytest.raises(GatewayAuthError, match="403: .*access:services!service=mochi-lab") as exc:
        connect(idle.url, unscoped)
    assert exc.value.status == 403 and unscoped not in str(exc.value)
    bob = MochiCluster(backend=connect(idle.url, tokens["bob"]))
    with pytest.raises(PermissionError, match="403: this action needs an admin"):
        bob.scale(2)
    with pytest.raises(PermissionError, match="403"):
        bob.shutdown_pool()
    before = {w["worker_id"]: w["started_at"] for w in mochi.workers()}
    MochiCluster(backend=connect(gateway.url, tokens["carol"])).scale(len(before))  # an admin may: same size here
    assert {w["worker_id"]: w["started_at"] for w in mochi.workers()} == before


def test_503_and_a_dead_server_are_StoreUnavailable_naming_the_url(hub, tokens, connect, tmp_path):
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store

    down = open_store(f"redis://127.0.0.1:{free_port()}/0")  # a store where nothing listens
    gw = start_gateway(hub, DirectBackend(Settings(data_dir=tmp_path / "data"), down, None))
    try:
        bob = connect(gw.url, tokens["bob"])
        with pytest.raises(StoreUnavailable, match=f"gateway at {gw.url}/ is unavailable .503: the job store"):
            bob.counts()
    finally:
        gw.stop()
        down.close()
    port = free_port()  # nobody listens there
    with pytest.raises(StoreUnavailable, match=f"cannot reach the mochi_lab gateway at http://127.0.0.1:{port}/"):
        connect(f"http://127.0.0.1:{port}/", tokens["bob"], timeout=2)


def test_other_answers_are_GatewayError(idle, hub, tokens, connect):
    carol = MochiCluster(backend=connect(idle.url, tokens["carol"]))  # an admin, on a gateway with no pool
    with pytest.raises(GatewayError, match="not JSON .is the URL the gateway's"):
        carol.backend.http.json("GET", "docs")  # a page of the gateway's, not its API
    with pytest.raises(GatewayError, match="409 conflict: this gateway serves a store with no pool") as exc:
        carol.scale(1)  # its pool is missing (a 500 is GatewayError too: tests/gateway/test_openapi.py)
    assert exc.value.status == 409
    hub_root = hub.public_url.removesuffix("hub/")
    with pytest.raises(GatewayError, match=r"redirected GET /whoami to /hub/whoami .is the URL the gateway's") as exc:
        connect(hub_root, tokens["bob"])  # the hub, not its service
    assert 300 <= exc.value.status < 400


def test_the_token_never_shows(idle, idle_store, tokens, connect, caplog, tmp_path):
    from mochi_lab import GenerationParams
    from mochi_lab.params import SubmitOptions

    caplog.set_level(logging.DEBUG)
    token = tokens["bob"]
    backend = connect(idle.url, token)
    c = MochiCluster(backend=backend)
    echoed = GenerationParams.stored({"prompt": "x", "seed": 1, **TINY, "model": token})  # the server says what it got
    with pytest.raises(ParamsError) as exc:
        backend.submit(echoed, SubmitOptions.parse())
    assert "got '***'" in str(exc.value)
    host = idle.url.removeprefix("http://")
    userinfo = connect(f"http://me:secret-pass@{host}", token)
    texts = [repr(backend), repr(c), c._repr_html_(), str(backend.info()), str(exc.value), repr(exc.value),
             repr(backend.http), repr(backend.http.client.auth), caplog.text, repr(userinfo), str(userinfo.info())]
    for text in texts:
        assert token not in text and "secret-pass" not in text
    assert backend.info() == {"backend": "gateway", "address": idle.url, "account": "bob", "model": "tiny"}


def test_an_unknown_model_fails_at_connect(idle, tokens, connect):
    with pytest.raises(ParamsError, match="model: must be one of .*tiny"):
        connect(idle.url, tokens["bob"], model="mochi-2")


# -- the pool --------------------------------------------------------------------------------------------
def test_wait_ready_and_the_workers_rows(gateway, idle, idle_store, tokens, connect):
    bob = MochiCluster(backend=connect(gateway.url, tokens["bob"]))
    bob.wait_ready(60)
    assert bob.workers() and all(r["uptime_s"] >= 0 for r in bob.workers())
    on_idle = MochiCluster(backend=connect(idle.url, tokens["bob"]))
    with pytest.raises(TimeoutError, match="workers not ready"):  # no worker at all
        on_idle.wait_ready(0.3)
    idle_store.put_worker({"worker_id": "w-oom", "state": "error", "error": "CUDA OOM", "started_at": time.time()}, 60)
    with pytest.raises(RuntimeError, match="worker w-oom failed to load"):
        on_idle.wait_ready(5)
    admin = MochiCluster(backend=connect(idle.url, tokens["carol"]))  # a worker's error is an admin's to read
    with pytest.raises(RuntimeError, match="worker w-oom failed to load: CUDA OOM"):
        admin.wait_ready(5)

