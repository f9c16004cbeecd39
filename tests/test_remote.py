"""The gateway backend (`mochi_lab.remote`): the handle flow over the gateway's HTTP contract.

Unit tests run the client against `remote_stub.GatewayStub`, an in-memory stand-in answering the
contract's shapes through httpx's MockTransport: they check the client's mapping (routes, the auth header,
errors to the direct backend's exceptions, token redaction, the artifact cache), not the product. No Ray.
"""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from mochi_lab import Experiment, JobNotFound, MochiCluster, ParamsError, StoreUnavailable  # noqa: E402
from mochi_lab.remote import GatewayAuthError, GatewayBackend, GatewayError, QuotaExceeded  # noqa: E402
from tests.support.remote_stub import ALICE, BOB, NOSCOPE, PNG, VIDEO, GatewayStub  # noqa: E402

URL = "http://gateway.test/services/mochi-lab/"
TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}


@pytest.fixture()
def stub() -> GatewayStub:
    return GatewayStub()


@pytest.fixture()
def connect(stub, tmp_path):
    opened = []

    def connect(token: str = BOB, **kw) -> GatewayBackend:
        kw.setdefault("cache_dir", tmp_path / "cache")
        backend = GatewayBackend(URL, token, transport=stub.transport(), **kw)
        opened.append(backend)
        return backend

    yield connect
    for b in opened:
        b.close()


@pytest.fixture()
def bob(connect) -> MochiCluster:
    return MochiCluster(backend=connect(BOB))


def _paths(stub: GatewayStub) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in stub.requests]


# -- choosing the backend --------------------------------------------------------
def test_an_http_address_or_MOCHI_LAB_GATEWAY_chooses_the_gateway(stub, monkeypatch, tmp_path):
    monkeypatch.setattr(httpx, "HTTPTransport", lambda **kw: stub.transport())
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", BOB)
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")  # what the process claims changes nothing
    with MochiCluster(URL, account="alice") as c:
        assert c.account == "bob" and c.backend.info()["backend"] == "gateway"
        assert c.backend.cache_dir == tmp_path / "gateway" / "gateway.test_services_mochi-lab" / "bob"
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", URL)
    with MochiCluster() as c:
        assert isinstance(c.backend, GatewayBackend) and c.account == "bob"
    assert {r.headers["authorization"] for r in stub.requests} == {f"token {BOB}"}


def test_the_embedded_default_stays_direct(monkeypatch):
    from mochi_lab.direct import DirectBackend

    started = []

    def fake_start(settings, model, pipeline, *, start_pool):
        started.append(settings)
        raise RuntimeError("direct")

    monkeypatch.setattr(DirectBackend, "start", staticmethod(fake_start))
    monkeypatch.delenv("MOCHI_LAB_GATEWAY", raising=False)
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster()
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", URL)  # an operator's explicit store keeps the direct backend
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(RuntimeError, match="direct"):
        MochiCluster("ray://127.0.0.1:10001")
    assert len(started) == 3


def test_no_token_is_a_clear_permission_error(monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(PermissionError, match="JUPYTERHUB_API_TOKEN"):
        MochiCluster(URL)


# -- the handle flow -------------------------------------------------------------
def test_the_account_is_the_servers_word(connect, stub):
    assert connect(BOB).account == "bob"
    assert connect(ALICE).account == "alice"
    assert stub.requests[0].url.path == "/services/mochi-lab/whoami"
    assert stub.requests[0].headers["authorization"] == f"token {BOB}"


def test_generate_wait_result_video_thumbnail(bob, stub, tmp_path):
    job = bob.generate("a red fox", seed=1, tags=["t"], priority=3, **TINY)
    sent = next(r for r in stub.requests if r.url.path.endswith("/generate"))
    import json

    body = json.loads(sent.content)
    assert body["params"]["prompt"] == "a red fox" and body["params"]["seed"] == 1
    assert (body["priority"], body["tags"], body["experiment"], body["idempotency_key"], body["reuse"]) == \
        (3, ["t"], None, None, True)
    assert job.record.account == "bob" and job.status in ("queued", "running")

    path = job.result(timeout=10)
    assert path.read_bytes() == VIDEO and path.parent == tmp_path / "cache" / "gateway.test_services_mochi-lab" / "bob"
    downloads = _paths(stub).count(f"GET /services/mochi-lab/download/{job.id}")
    assert job.result() == path and job.video.value == VIDEO  # cached: no second download
    assert _paths(stub).count(f"GET /services/mochi-lab/download/{job.id}") == downloads == 1
    assert job.thumbnail == PNG
    assert job.video.format == "mp4"
    saved = job.save(tmp_path / "out")
    assert saved.read_bytes() == VIDEO
    assert [j.id for j in bob.jobs()] == [job.id]
    assert bob.jobs(status="done")[0].id == job.id and bob.jobs(text="nothing") == []
    assert bob.counts()["done"] == 1
    assert bob.generate("a red fox", seed=1, **TINY).id == job.id  # the result cache is the server's
    assert bob.generate("a red fox", seed=1, force=True, **TINY).id != job.id


def test_list_pages_past_the_servers_cap(bob, stub, monkeypatch):
    import mochi_lab.remote

    stub.page_max = 2
    monkeypatch.setattr(mochi_lab.remote, "_PAGE", 2)
    ids = [bob.generate(f"page {i}", seed=i, **TINY).id for i in range(5)]
    assert [j.id for j in bob.jobs(limit=100)] == ids[::-1]
    assert [j.id for j in bob.jobs(limit=3, offset=1)] == ids[::-1][1:4]
    assert [r.url.params["limit"] for r in stub.requests if "/jobs/" in r.url.path][:3] == ["2", "2", "2"]


def test_save_artifact_streams_to_the_destination_without_the_cache(bob, stub, tmp_path):
    job = bob.generate("a cat", seed=2, **TINY)
    job.wait(10)
    dest = bob.backend.save_artifact(job.id, "video", tmp_path / "one.mp4")
    assert dest.read_bytes() == VIDEO
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["one.mp4"]  # no .part file left
    assert job.save(tmp_path / "two.mp4").read_bytes() == VIDEO  # result() first: through the cache


def test_cancel_delete_and_the_cached_files(bob, stub):
    queued = bob.generate("cancel me", seed=3, **TINY)
    assert queued.cancel(timeout=0) == "cancelled"
    done = bob.generate("keep me", seed=4, **TINY)
    path = done.result(10)
    bob.delete(done.id)
    assert not path.exists()
    with pytest.raises(JobNotFound):
        bob.job(done.id)


def test_another_accounts_job_is_not_found(bob, connect, stub):
    theirs = MochiCluster(backend=connect(ALICE)).generate("alice's", seed=5, **TINY)
    for call in (lambda: bob.job(theirs.id), lambda: bob.backend.cancel(theirs.id),
                 lambda: bob.delete(theirs.id), lambda: bob.backend.artifact_path(theirs.id, "video"),
                 lambda: bob.backend.artifact(theirs.id, "thumbnail")):
        with pytest.raises(JobNotFound, match=theirs.id):
            call()
    before = len(stub.requests)
    with pytest.raises(JobNotFound):
        bob.job("../workers/shutdown")  # not an id: refused here, nothing is sent
    assert len(stub.requests) == before


def test_an_unfinished_jobs_artifact_is_FileNotFoundError(bob):
    job = bob.generate("slow", seed=6, **TINY)
    with pytest.raises(FileNotFoundError, match="has no video"):
        bob.backend.artifact_path(job.id, "video")
    with pytest.raises(ValueError, match="artifact must be one of"):
        bob.backend.artifact_path(job.id, "weights")
    assert job.thumbnail is None  # not done: no request for bytes


def test_a_cut_short_download_leaves_nothing_behind(bob, stub, tmp_path):
    job = bob.generate("short", seed=7, **TINY)
    job.wait(10)
    stub.inject("download/", 200, VIDEO[:100], {"content-length": str(len(VIDEO))})
    with pytest.raises(StoreUnavailable, match="cut short"):
        job.result()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert job.result().read_bytes() == VIDEO


def test_events_stream_progress_to_the_end(bob):
    job = bob.generate("events", seed=8, **TINY)
    seen = [(r.status, r.step) for r in bob.backend.events(job.id)]
    assert seen[-1][0] == "done" and ("running", 1) in seen


def test_wait_follows_the_pushed_stream_across_cuts(bob, stub):
    stub.steps = 6
    job = bob.generate("cut", seed=9, **TINY)
    stub.cut_events = 2
    assert job.wait(timeout=30).status == "done" and job.record.step == 6
    paths = _paths(stub)
    assert stub.cut_events == 0 and paths.count(f"GET {stub.prefix}/events/{job.id}") == 3, paths
    assert paths.count(f"GET {stub.prefix}/status/{job.id}") == 2, "one state read per cut, no polling"


# -- errors ----------------------------------------------------------------------
def test_422_is_ParamsError_with_the_servers_words(bob, stub):
    stub.inject("generate", 422,
                {"error": "invalid", "detail": "invalid generation parameters:\n  model: must be one of tiny"})
    with pytest.raises(ParamsError, match="model: must be one of tiny"):
        bob.generate("x", **TINY)


def test_401_and_403_are_PermissionErrors_without_the_token(connect, stub):
    with pytest.raises(GatewayAuthError, match="refused the token") as exc:
        connect("tok-wrong-0000000000000000")
    assert isinstance(exc.value, PermissionError) and exc.value.status == 401
    assert "tok-wrong" not in str(exc.value) and "tok-wrong" not in repr(exc.value)
    with pytest.raises(GatewayAuthError, match="403.*scope") as exc:
        connect(NOSCOPE)
    assert NOSCOPE not in str(exc.value)
    bob = MochiCluster(backend=connect(BOB))
    with pytest.raises(PermissionError, match="403.*admins"):
        bob.scale(2)
    with pytest.raises(PermissionError):
        bob.shutdown_pool()
    MochiCluster(backend=connect(ALICE)).scale(2)
    assert stub.scaled == [2]


def test_429_is_QuotaExceeded_naming_the_limit(bob, stub):
    stub.inject("generate", 429, {"error": "quota", "detail": "at most 4 queued jobs per account"})
    with pytest.raises(QuotaExceeded, match="at most 4 queued jobs"):
        bob.generate("one too many", **TINY)


def test_503_and_a_dead_server_are_StoreUnavailable_naming_the_url(bob, stub, tmp_path):
    stub.inject("counts", 503, {"error": "unavailable", "detail": "store down"})
    with pytest.raises(StoreUnavailable, match="gateway.test.*503: store down"):
        bob.counts()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        GatewayBackend(f"http://127.0.0.1:{port}/", BOB, timeout=2, cache_dir=tmp_path)


def test_other_errors_are_GatewayError(bob, stub):
    stub.inject("counts", 500, {"error": "internal", "detail": "boom"})
    with pytest.raises(GatewayError, match="500 internal: boom"):
        bob.counts()
    stub.inject("models", 200, b"<html>hub login</html>", {"content-type": "text/html"})
    with pytest.raises(GatewayError, match="not JSON"):
        bob.models()
    stub.inject("counts", 302, b"", {"location": "/hub/login?next=x"})
    with pytest.raises(GatewayError, match="redirected GET .*/counts to /hub/login "):
        bob.counts()


def test_the_token_never_shows(connect, stub, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    backend = connect(BOB)
    c = MochiCluster(backend=backend)
    stub.inject("counts", 500, {"error": "internal", "detail": f"bad token {BOB}"})
    with pytest.raises(GatewayError) as exc:
        c.counts()
    userinfo = GatewayBackend("http://me:secret-pass@gateway.test/", BOB, transport=stub.transport(),
                              cache_dir=tmp_path)
    texts = [repr(backend), repr(c), c._repr_html_(), str(backend.info()), str(exc.value), repr(exc.value),
             repr(backend._client.auth), caplog.text, repr(userinfo), str(userinfo.info())]
    for text in texts:
        assert BOB not in text and "secret-pass" not in text
    assert "***" in str(exc.value)
    assert backend.info() == {"backend": "gateway", "address": URL, "account": "bob", "model": "tiny"}


def test_an_unknown_model_fails_at_connect(connect):
    with pytest.raises(ParamsError, match="model: must be one of mochi-1-preview, tiny"):
        connect(BOB, model="mochi-2")


# -- the pool and experiments ---------------------------------------------------
def test_workers_and_wait_ready(bob, stub):
    stub.workers = [{"worker_id": "w0", "state": "loading", "started_at": 0.0}]
    bob.wait_ready(5)
    assert stub.workers[0]["state"] == "idle" and bob.workers()[0]["uptime_s"] > 0
    stub.workers = [{"worker_id": "w0", "state": "error", "error": "CUDA OOM", "started_at": 0.0}]
    with pytest.raises(RuntimeError, match="CUDA OOM"):
        bob.wait_ready(5)
    stub.workers = []
    with pytest.raises(TimeoutError):
        bob.wait_ready(0.3)


def test_an_experiment_sweep_on_the_gateway(bob, connect):
    with pytest.raises(KeyError):
        bob.backend.get_experiment("nope")
    exp = bob.experiment("fox", description="two seeds", tags=["demo"])
    jobs = exp.sweep(["a fox", "a dog"], seeds=[1], **TINY)
    assert len(jobs) == 2 and {j.record.experiment for j in jobs} == {"fox"}
    assert exp.sweep(["a fox", "a dog"], seeds=[1], **TINY)[0].id == jobs[0].id  # idempotent
    assert exp.wait(10, progress=False)["done"] == 2
    df = exp.to_dataframe()
    assert len(df) == 2 and set(df["status"]) == {"done"}
    assert [e.name for e in bob.experiments()] == ["fox"]
    alice = MochiCluster(backend=connect(ALICE))
    with pytest.raises(KeyError):
        alice.experiment("fox", create=False)
    assert isinstance(Experiment.open(bob.backend, "fox", create=False), Experiment)


# -- against the real server (mochi_lab.gateway on uvicorn, 127.0.0.1) ---------------------------------
# Tokens here are static (hashed in the gateway's config), so these tests need no JupyterHub; the hub
# path of the server is tests/gateway's. `gateway_url` + `alice_token` + `bob_token` are all the handle
# flow needs: the same test runs against a hub-backed gateway given fixtures of those names.
class _Uvicorn:
    def __init__(self, app):
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _static_tokens(**accounts: str) -> dict:
    import hashlib

    return {hashlib.sha256(tok.encode()).hexdigest(): {"account": acct, "admin": acct == "alice"}
            for acct, tok in accounts.items()}


@pytest.fixture(scope="module")
def storefront_url(tmp_path_factory):
    """The real gateway over a store of its own and no pool (jobs stay queued). No Ray."""
    pytest.importorskip("mochi_lab.gateway")
    from mochi_lab.direct import DirectBackend
    from mochi_lab.gateway import create_app
    from mochi_lab.settings import GatewayConfig, Settings
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("storefront"), account="alice")
    store = open_store(settings.store_url)
    shared = DirectBackend(settings, store, None)
    config = GatewayConfig(static_tokens=_static_tokens(alice=ALICE, bob=BOB), max_active_jobs=2)
    with _Uvicorn(create_app(settings, backend_factory=lambda: shared, config=config)) as url:
        yield url
    store.close()


def test_the_real_server_maps_like_the_stub(storefront_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", BOB)
    with MochiCluster(storefront_url, account="alice") as bob, \
            MochiCluster(backend=GatewayBackend(storefront_url, ALICE, cache_dir=tmp_path)) as alice:
        assert (bob.account, alice.account) == ("bob", "alice")
        assert "tiny" in bob.models()
        job = bob.generate("queued forever", seed=1, **TINY)
        assert bob.job(job.id).status == "queued" and [j.id for j in bob.jobs()] == [job.id]
        assert bob.generate("queued forever", seed=1, **TINY).id == job.id  # the server's result cache
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="still queued"):  # waits on the pushed stream, within its time
            job.wait(timeout=0.5)
        assert 0.5 <= time.monotonic() - t0 < 3
        with pytest.raises(FileNotFoundError, match="has no video .status queued"):
            bob.backend.artifact_path(job.id, "video")
        with pytest.raises(JobNotFound):
            alice.job(job.id)
        with pytest.raises(JobNotFound):
            alice.backend.artifact(job.id, "thumbnail")
        with pytest.raises(ParamsError, match="num_frames"):
            bob.backend.submit(_stored(num_frames=8), _options())
        with pytest.raises(ParamsError, match="model: must be one of"):
            bob.generate("x", model="nope", **TINY)
        bob.generate("second", seed=2, **TINY)
        with pytest.raises(QuotaExceeded, match="max_active_jobs=2"):
            bob.generate("third", seed=3, **TINY)
        assert bob.counts()["queued"] == 2
        with pytest.raises(PermissionError, match="403"):
            bob.scale(1)
        with pytest.raises(KeyError):
            bob.backend.get_experiment("nope")
        exp = bob.experiment("e1", description="d")
        assert [e.name for e in bob.experiments()] == ["e1"] and exp.description == "d"
        with pytest.raises(KeyError):
            alice.experiment("e1", create=False)
        assert job.cancel(timeout=0) == "cancelled"
        bob.delete(job.id)
        with pytest.raises(JobNotFound):
            bob.job(job.id)
    with pytest.raises(GatewayAuthError, match="401") as exc:
        GatewayBackend(storefront_url, "not-a-token-0000000000", cache_dir=tmp_path)
    assert "not-a-token" not in str(exc.value)


def _stored(**over):
    from mochi_lab import GenerationParams

    return GenerationParams.stored({"prompt": "x", "seed": 1, **TINY, **over})


def _options():
    from mochi_lab.params import SubmitOptions

    return SubmitOptions.parse()


@pytest.fixture(scope="module")
def tokens_for_the_pool():
    return {"alice": "tok-e2e-alice-" + "a1" * 16, "bob": "tok-e2e-bob-" + "b2" * 16}


@pytest.fixture(scope="module")
def gateway_url(mochi, test_settings, tokens_for_the_pool):
    """The real gateway over the session's store and Ray pool (tests/conftest.py's `mochi`)."""
    pytest.importorskip("mochi_lab.gateway")
    from mochi_lab.gateway import create_app
    from mochi_lab.settings import GatewayConfig

    shared = mochi.backend
    config = GatewayConfig(static_tokens=_static_tokens(**tokens_for_the_pool), events_poll_s=0.02)
    with _Uvicorn(create_app(test_settings, backend_factory=lambda: shared, config=config)) as url:
        yield url


@pytest.fixture(scope="module")
def alice_token(tokens_for_the_pool):
    return tokens_for_the_pool["alice"]


@pytest.fixture(scope="module")
def bob_token(tokens_for_the_pool):
    return tokens_for_the_pool["bob"]


def test_the_handle_flow_on_the_gateway(gateway_url, alice_token, bob_token, tmp_path, monkeypatch):
    """Bob's notebook: only JUPYTERHUB_API_TOKEN; claiming to be alice (env or account=) changes nothing."""
    from tests.support.remote_flow import handle_flow

    handle_flow(gateway_url, alice_token, bob_token, tmp_path, monkeypatch)
