"""The gateway's HTTP API against a real JupyterHub, real uvicorn servers, the session's store and its pool
(two thread workers). What both backends share is tests/client/backend's contract suite; the gateway client's
own ways are tests/client/test_remote.py.

`storefront` is a gateway over a store of its own with no pool (its jobs stay queued: quotas, the page,
refusals); `gateway` is the one over the session's store and pool (generation, downloads, isolation, progress).
Jobs that must be running while the test acts are held at the test gate (`hold`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from tests.support.backends import unique
from tests.support.hub_fixtures import AUTH_CACHE_S
from tests.support.jobkit import TINY, strip_pictures
from tests.support.ports import free_port

EVIL = "<img src=x onerror=alert(1)>"
EVIL_ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
FINISHED = {"done", "failed", "cancelled"}


def wait_done(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/status/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in FINISHED:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(0.1)


def _tiny(**over):
    return {"prompt": "a cat surfing a wave", **TINY, **over}


# -- identity ------------------------------------------------------------------------------------------
def test_healthz_is_open_and_whoami_is_the_hub_user(storefront, tokens):
    with storefront.client() as anon:
        assert anon.get("/healthz").json() == {"ok": True}
    for user, admin in (("alice", False), ("bob", False), ("carol", True), ("dave", True)):
        with storefront.client(tokens[user]) as c:
            assert c.get("/whoami").json() == {"account": user, "admin": admin}
    # both schemes
    with storefront.client(headers={"Authorization": f"Bearer {tokens['bob']}"}) as c:
        assert c.get("/whoami").json()["account"] == "bob"


def test_missing_garbage_revoked_and_unscoped_tokens_are_refused(storefront, hub, tokens):
    with storefront.client() as anon:
        r = anon.get("/whoami")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert anon.get("/status/18c0c0c0c0c-0123456789ab").status_code == 401
        for header in ("token nonsense-token-123", "Bearer " + "f" * 64, "Basic YWxpY2U6eA==", "token"):
            r = anon.get("/whoami", headers={"Authorization": header})
            assert r.status_code == 401, header
            assert r.json() == {"error": "unauthorized", "detail": r.json()["detail"]}
    unscoped = hub.token("alice", scopes=["read:users:name!user"])
    with storefront.client(unscoped) as c:
        r = c.get("/whoami")
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "access:services!service=mochi-lab" in r.json()["detail"]
        assert c.post("/generate", json={"params": _tiny()}).status_code == 403
    minted = hub.mint("bob")
    with storefront.client(minted["token"]) as c:
        assert c.get("/whoami").status_code == 200
        hub.revoke("bob", minted["id"])
        time.sleep(AUTH_CACHE_S + 0.3)
        r = c.get("/whoami")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    # no response carries the token
    assert minted["token"] not in r.text and unscoped not in r.text


def test_admin_actions_need_an_admin(storefront, tokens):
    for user in ("alice", "bob"):
        with storefront.client(tokens[user]) as c:
            for path, body in (("/workers/scale", {"n": 2}), ("/workers/shutdown", None)):
                r = c.post(path, json=body)
                assert r.status_code == 403 and r.json()["error"] == "forbidden", (user, path, r.text)
    with storefront.client(tokens["carol"]) as c:  # an admin passes the door; a bad n is refused before acting
        r = c.post("/workers/scale", json={"n": True})
        assert r.status_code == 422 and "n must be" in r.json()["detail"]


def test_listing_another_account_is_not_found_unless_admin(storefront, tokens):
    with storefront.client(tokens["bob"]) as bob:
        r = bob.get("/jobs/alice")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        assert bob.get("/jobs/nobody-at-all").json() == r.json()  # like an unknown account
        assert bob.get("/jobs/bob").status_code == 200
    with storefront.client(tokens["carol"]) as carol:
        assert carol.get("/jobs/alice").status_code == 200


# -- the door ------------------------------------------------------------------------------------------
def test_a_body_cannot_choose_the_account(storefront, tokens):
    with storefront.client(tokens["alice"]) as alice:
        before = alice.get("/counts").json()
        r = alice.post("/generate", json={"params": _tiny(seed=7), "account": "bob"})
        assert r.status_code == 422 and r.json()["error"] == "invalid" and "account" in r.json()["detail"]
        r = alice.post("/generate", json={"params": {**_tiny(seed=7), "account": "bob"}})
        assert r.status_code == 422 and "account" in r.json()["detail"]
        assert alice.get("/counts").json() == before  # nothing queued
        r = alice.post("/generate", json={"params": _tiny(seed=7)})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["account"] == "alice"
        assert "fence" not in job and "lease_expires_at" not in job
        assert alice.get(f"/status/{job['id']}").json()["account"] == "alice"
    with storefront.client(tokens["bob"]) as bob:
        assert all(j["account"] == "bob" for j in bob.get("/jobs/bob").json())
        assert bob.get(f"/status/{job['id']}").status_code == 404


def test_invalid_params_are_422_naming_the_field(storefront, tokens):
    with storefront.client(tokens["alice"]) as alice:
        before = alice.get("/counts").json()
        r = alice.post("/generate", json={"params": _tiny(num_frames=84)})
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "invalid" and "num_frames" in body["detail"] and "79 or 85" in body["detail"]
        r = alice.post("/generate", json={"params": _tiny(model="no-such-model")})
        assert r.status_code == 422 and "model" in r.json()["detail"]
        r = alice.post("/generate", json={"params": _tiny(), "tags": "not-a-list"})
        assert r.status_code == 422 and "tags" in r.json()["detail"]
        r = alice.post("/generate", json={"params": _tiny(num_frames=163, height=480, width=848,
                                                            num_inference_steps=64)})
        assert r.status_code == 422 and "token-steps" in r.json()["detail"]  # the pool's admission
        assert alice.get("/counts").json() == before


def test_quota_refuses_with_429_and_queues_nothing(storefront, tokens):
    with storefront.client(tokens["bob"]) as bob:
        active = lambda: sum(bob.get("/counts").json()[s] for s in ("queued", "running"))  # noqa: E731
        seed = 100
        while active() < 3:  # the storefront's max_active_jobs
            seed += 1
            assert bob.post("/generate", json={"params": _tiny(seed=seed)}).status_code == 201
        listed = len(bob.get("/jobs/bob").json())
        r = bob.post("/generate", json={"params": _tiny(seed=999)})
        assert r.status_code == 429
        assert r.json()["error"] == "quota" and "max_active_jobs=3" in r.json()["detail"]
        assert active() == 3 and len(bob.get("/jobs/bob").json()) == listed
        # cancelling one frees a place
        job = bob.get("/jobs/bob", params={"status": "queued"}).json()[0]
        assert bob.post(f"/cancel/{job['id']}").json()["status"] == "cancelled"
        assert bob.post("/generate", json={"params": _tiny(seed=999)}).status_code == 201


def test_the_queue_shows_other_accounts_jobs_by_place_only_and_names_them_to_admins(storefront, tokens):
    secret = f"erin's secret plan {time.time_ns()}"
    with storefront.client(tokens["erin"]) as erin:
        job = erin.post("/generate", json={"params": _tiny(prompt=secret, seed=11)}).json()
        try:
            rows = erin.get("/queue", params={"limit": 1000}).json()
            assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))
            (own,) = [r for r in rows if r["id"] == job["id"]]
            assert own["mine"] and own["prompt"] == secret and own["account"] == "erin" and own["width"] == 32
            with storefront.client(tokens["bob"]) as bob:
                seen = bob.get("/queue", params={"limit": 1000}).json()
                text = json.dumps(seen)
                assert secret not in text and job["id"] not in text and "erin" not in text
                theirs = seen[own["position"] - 1]  # the same place for every viewer
                assert not theirs["mine"] and (theirs["id"], theirs["account"], theirs["prompt"]) == (None, None, None)
                assert (theirs["width"], theirs["num_frames"], theirs["steps"]) == (32, 7, 2)
                for bad in (0, 1001, "all", -1):
                    r = bob.get("/queue", params={"limit": bad})
                    assert r.status_code == 422 and "limit" in r.text, (bad, r.text)
            with storefront.client(tokens["carol"]) as carol:  # an admin: whose and which, still not what
                row = carol.get("/queue", params={"limit": 1000}).json()[own["position"] - 1]
                assert (row["account"], row["id"], row["prompt"]) == ("erin", job["id"], None)
        finally:
            erin.post(f"/cancel/{job['id']}")


def test_markup_in_every_field_is_escaped_on_the_page(storefront, tokens):
    with storefront.client(tokens["carol"]) as carol:
        r = carol.post("/generate", json={"params": _tiny(prompt=f"a cat {EVIL}", negative_prompt=EVIL, seed=5),
                                           "tags": [EVIL, "plain"]})
        assert r.status_code == 201, r.text
        page = carol.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert EVIL not in html and "<img" not in html
        assert html.count(EVIL_ESCAPED) >= 3  # prompt, negative prompt, tag
        assert "carol" in html and "innerHTML" not in html
        csp = page.headers["content-security-policy"]
        assert "script-src 'nonce-" in csp and "unsafe-inline" not in csp
    with storefront.client() as anon:  # a browser with no session is sent to sign in
        r = anon.get("/", headers={"Accept": "text/html"})
        assert r.status_code == 303 and r.headers["location"].endswith("login")


def test_openapi_docs_are_served(storefront):
    with storefront.client() as anon:
        assert anon.get("/docs").status_code == 200
        paths = anon.get("/openapi.json").json()["paths"]
        assert {"/generate", "/status/{job_id}", "/download/{job_id}", "/events/{job_id}"} <= set(paths)


# -- on the pool ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alice_job(gateway, tokens):
    with gateway.client(tokens["alice"]) as alice:
        r = alice.post("/generate", json={"params": _tiny(seed=4242), "reuse": False})
        assert r.status_code == 201, r.text
        job = wait_done(alice, r.json()["id"])
    assert job["status"] == "done", job
    return job


def test_alice_generates_polls_downloads_and_ranges(gateway, tokens, alice_job, tmp_path):
    from mochi_lab.video import probe

    job_id = alice_job["id"]
    assert alice_job["artifacts"] == {"video": f"download/{job_id}", "thumbnail": f"thumbnail/{job_id}"}
    with gateway.client(tokens["alice"]) as alice:
        r = alice.get(f"/download/{job_id}")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.headers["accept-ranges"] == "bytes"
        video = r.content
        (tmp_path / "v.mp4").write_bytes(video)
        info = probe(tmp_path / "v.mp4")
        assert info is not None
        r = alice.get(f"/download/{job_id}", headers={"Range": "bytes=10-99"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 10-99/{len(video)}"
        assert r.content == video[10:100]
        r = alice.get(f"/download/{job_id}", headers={"Range": "bytes=-16"})
        assert r.status_code == 206 and r.content == video[-16:]
        r = alice.get(f"/thumbnail/{job_id}")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        with alice.stream("GET", f"/events/{job_id}") as s:  # a finished job: one event, then the end
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
        assert [e["status"] for e in events] == ["done"]
        listed = alice.get("/jobs/alice", params={"status": "done"}).json()
        assert job_id in {j["id"] for j in listed}
        assert str(gateway.app.state.config.prefix) == "/"
    assert "/" not in json.dumps(alice_job["artifacts"]).replace(f"download/{job_id}", "").replace(
        f"thumbnail/{job_id}", "")  # route names, never server paths


def test_bob_gets_404_for_everything_of_alices(gateway, tokens, alice_job):
    job_id = alice_job["id"]
    unknown = "18c0c0c0c0c-0123456789ab"
    with gateway.client(tokens["alice"]) as alice:
        assert alice.put("/experiments/alice-exp", json={"name": "alice-exp", "account": "bob", "description": "x",
                                                         "tags": [], "runs": []}).status_code == 204
        assert alice.get("/experiments/alice-exp").json()["account"] == "alice"  # forced
    with gateway.client(tokens["bob"]) as bob:
        for method, path in (("GET", "/status/{}"), ("GET", "/download/{}"), ("GET", "/thumbnail/{}"),
                             ("GET", "/preview/{}"), ("GET", "/events/{}"), ("POST", "/cancel/{}"), ("POST", "/rerun/{}"),
                             ("DELETE", "/jobs/{}")):
            mine = bob.request(method, path.format(job_id))
            none = bob.request(method, path.format(unknown))
            assert mine.status_code == 404, (method, path, mine.text)
            assert mine.json() == none.json() == {"error": "not_found", "detail": "job not found"}, (method, path)
        for path in ("/experiments/alice-exp", "/experiments/alice-exp/export"):
            assert bob.get(path).status_code == 404, path
        assert bob.post("/experiments/alice-exp/resume").status_code == 404
        assert "alice-exp" not in {e["name"] for e in bob.get("/experiments").json()}
    with gateway.client(tokens["alice"]) as alice:  # untouched
        assert alice.get(f"/status/{job_id}").json()["status"] == "done"
        assert alice.get(f"/download/{job_id}").status_code == 200
        assert alice.get(f"/preview/{job_id}").status_code == 204  # done: the video replaced the preview


def _sse_steps(events: list[dict]) -> list[tuple]:
    return [(e["status"], e["stage"], e["step"]) for e in events]


async def _listen(url: str, token: str, job_id: str, ready: asyncio.Event | None = None) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"}, timeout=300,
                                 trust_env=False) as c:
        async with c.stream("GET", f"/events/{job_id}") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    assert event == "progress"
                    out.append(json.loads(line[5:]))
                    if ready is not None:
                        ready.set()
    return out


def test_progress_reaches_20_listeners_in_order_and_ends_terminal(gateway, tokens, mochi, hold):
    """20 concurrent listeners on one job: each sees the same changes, in order, from queued to done."""
    n_workers = len(mochi.backend.pool.workers)
    steps = 20
    with gateway.client(tokens["erin"]) as erin:  # every worker held with erin's jobs: the watched job waits queued
        busy = unique("erin keeps the pool busy")
        gate = hold(busy, "denoising", 1)
        blockers = [erin.post("/generate", json={"params": _tiny(prompt=busy, seed=500 + i), "reuse": False}).json()
                    for i in range(n_workers)]
        gate.wait_reached(n_workers)
    with gateway.client(tokens["alice"]) as alice:
        job = alice.post("/generate", json={"params": _tiny(num_inference_steps=steps, seed=777),
                                            "reuse": False}).json()

    async def scenario():
        readies = [asyncio.Event() for _ in range(20)]
        listeners = [asyncio.ensure_future(_listen(gateway.url, tokens["alice"], job["id"], ready))
                     for ready in readies]
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 120)
        with gateway.client(tokens["erin"]) as erin:  # every listener is attached: let the job run
            for b in blockers:
                erin.post(f"/cancel/{b['id']}")
            for b in blockers:
                assert wait_done(erin, b["id"])["status"] == "cancelled"
        return await asyncio.wait_for(asyncio.gather(*listeners), 300)

    results = asyncio.run(scenario())
    with gateway.client(tokens["alice"]) as alice:
        final = alice.get(f"/status/{job['id']}").json()
    assert final["status"] == "done" and final["step"] == final["total_steps"] == steps
    order = {"queued": 0, "loading": 1, "denoising": 2, "decoding": 3, "encoding": 4, "done": 5}
    first = _sse_steps(results[0])
    for events in results:
        seq = _sse_steps(events)
        assert seq == first, "every listener sees the same changes"
        assert events[0]["status"] == "queued", "listeners were attached while the job was queued"
        assert events[-1]["status"] == "done" and events[-1]["step"] == steps
        keys = [(order.get(stage, 2), step) for _, stage, step in seq]
        # a state comes again only in a row: the live figures its worker writes again while it decodes or encodes
        changes = [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]
        assert keys == sorted(keys) and len(set(changes)) == len(changes), f"in order, no repeats: {seq}"
        stepped = [step for _, stage, step in changes if stage in ("denoising", "decoding")]
        assert stepped == list(range(steps + 1)), "every step (the last one decodes), from the store's log"
    assert gateway.app.state.progress.pollers() == 0  # the shared poller ended with the job


def test_the_fan_out_delivers_every_change_to_every_listener():
    """ProgressHub against a backend whose job advances one step per read: the poller sees every state, and
    each of 20 listeners must get all of them, in order (the fan-out drops nothing, even for slow readers)."""
    from mochi_lab.gateway.app import ProgressHub
    from mochi_lab.model import JobRecord

    total = 30

    class Stepping:
        account = "alice"

        def __init__(self):
            self.reads = 0

        def get(self, job_id):
            self.reads += 1
            k = self.reads - 1
            if k == 0:
                return JobRecord(job_id, "alice", {}, status="queued", stage="queued")
            if k <= total + 1:
                step = k - 1
                return JobRecord(job_id, "alice", {}, status="running", stage="denoising" if step < total else
                                 "decoding", step=step, total_steps=total)
            return JobRecord(job_id, "alice", {}, status="done", stage="done", step=total, total_steps=total)

    async def scenario():
        hub = ProgressHub(poll_s=0.001)
        backend = Stepping()

        async def listener(i):
            seen = []
            async for item in hub.listen(backend, "18c0c0c0c0c-0123456789ab"):
                seen.append((item["status"], item["step"]))
                if i % 4 == 0:
                    await asyncio.sleep(0.003)  # a slow reader
            return seen

        # all subscribe before the poller's first read (they start in the same loop turn)
        return await asyncio.gather(*(listener(i) for i in range(20)))

    results = asyncio.run(scenario())
    want = [("queued", 0)] + [("running", s) for s in range(total + 1)] + [("done", total)]
    for seen in results:
        assert seen == want


@pytest.mark.parametrize("between", ["after the record's read", "after the log's read"])
def test_a_claim_between_the_pollers_two_reads_never_shows_the_job_queued_again(tmp_path, between):
    """The hub reads a job's record and its progress log one after the other; the worker may claim the job
    and write its first step between the two. Listeners must still see queued, then running, never back."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.gateway.app import ProgressHub
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="alice")
    store = open_store(settings.store_url)
    backend = DirectBackend(settings, store, None)
    job = store.enqueue("alice", {"prompt": "p"})
    claimed = []

    def then_claim(read):  # the real read; the first time, the worker's claim and first step right after it
        def wrapped(*args):
            try:
                return read(*args)
            finally:
                if not claimed:
                    claimed.append(store.claim("w1", 60))
                    store.progress(job.id, claimed[0].token, stage="denoising", step=0, total=2)

        return wrapped

    if between == "after the record's read":
        backend.get = then_claim(backend.get)
    else:
        store.progress_since = then_claim(store.progress_since)

    async def scenario():
        hub = ProgressHub(poll_s=0.01)
        seen = []
        async for item in hub.listen(backend, job.id):
            seen.append((item["status"], item["stage"], item["step"]))
            if item["status"] == "running" and item["step"] == 0:
                store.progress(job.id, claimed[0].token, stage="denoising", step=1, total=2)
                store.complete(job.id, claimed[0].token, artifacts={"video": "/srv/x.mp4"}, timings={}, meta={})
        return seen

    try:
        seen = asyncio.run(asyncio.wait_for(scenario(), 30))
        ranks = [{"queued": 0, "running": 1, "done": 2}[status] for status, _, _ in seen]
        assert ranks == sorted(ranks) and ranks[-1] == 2 and 1 in ranks, seen
    finally:
        store.close()


def test_static_tokens_and_an_unreachable_hub(tmp_path):
    """Hashed static tokens beside a hub; a hub that is down is a 503. (The page's sign-in and sessions:
    tests/gateway/test_gateway_web.py.)"""
    from starlette.testclient import TestClient

    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.gateway.auth import StaticTokens, hash_token
    from mochi_lab.store import open_store

    with pytest.raises(ValueError, match="sha256"):
        StaticTokens({"plain-token": {"account": "alice"}})
    settings = Settings(data_dir=tmp_path, account="alice")
    store = open_store(settings.store_url)
    shared = DirectBackend(settings, store, None)
    static = {hash_token("alice-secret"): {"account": "alice"}, hash_token("root-secret"): {"account": "ops",
                                                                                          "admin": True}}
    down = free_port()  # nothing listens there: the hub is down
    config = GatewayConfig(static_tokens=static, hub_api_url=f"http://127.0.0.1:{down}/hub/api")
    app = create_app(settings, backend_factory=lambda: shared, config=config)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as c:
            assert c.get("/whoami", headers={"Authorization": "token alice-secret"}).json() == \
                {"account": "alice", "admin": False}
            assert c.get("/whoami", headers={"Authorization": "Bearer root-secret"}).json()["admin"] is True
            r = c.get("/whoami", headers={"Authorization": "token not-a-static-one"})  # falls to the hub: down
            assert r.status_code == 503 and r.json()["error"] == "unavailable" and "not-a-static-one" not in r.text
    finally:
        store.close()


def test_queued_jobs_of_every_account_share_one_read_of_the_workers_a_second(tmp_path):
    """Per-request backends share the pool's presence: many /status polls of queued jobs, from two
    accounts, read the worker rows once a second in all, and the stage follows the rows."""
    from fastapi.testclient import TestClient

    from mochi_lab.client.direct import WAITING_STAGE, DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.gateway.auth import hash_token
    from mochi_lab.pool.driver import Pool
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="ops")
    store = open_store(settings.store_url)
    reads = []
    workers = store.workers

    def counted_workers():  # the real store, counting its reads
        reads.append(time.monotonic())
        return workers()

    store.workers = counted_workers
    shared = DirectBackend(settings, store, Pool(settings, store))  # a pool with no actors started
    users = {"alice": "alice-secret", "bob": "bob-secret"}
    config = GatewayConfig(static_tokens={hash_token(t): {"account": a} for a, t in users.items()})
    app = create_app(settings, backend_factory=lambda: shared, config=config)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as c:
            jobs = {a: c.post("/generate", json={"params": {"prompt": "x", **TINY}},
                              headers={"Authorization": f"token {t}"}).json()["id"] for a, t in users.items()}
            reads.clear()
            t0 = time.monotonic()
            stages = [c.get(f"/status/{jobs[a]}", headers={"Authorization": f"token {users[a]}"}).json()["stage"]
                      for _ in range(10) for a in users]
            assert stages == [WAITING_STAGE] * 20
            assert len(reads) <= 1 + (time.monotonic() - t0), reads
            store.put_worker({"worker_id": "mochi-worker-x", "state": "idle"}, 60)
            time.sleep(1.1)
            r = c.get(f"/status/{jobs['bob']}", headers={"Authorization": "token bob-secret"}).json()
            assert (r["status"], r["stage"]) == ("queued", "queued")
    finally:
        store.close()


def test_a_whole_job_between_two_polls_still_reaches_every_listener_step_by_step(tmp_path, redis_url):
    """The running states come from the store's progress log: a job that runs from its first to its last
    step between two polls of the hub still reaches each of 20 listeners one step at a time, in order."""
    import threading
    import uuid

    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.gateway.app import ProgressHub
    from mochi_lab.store import open_store

    total = 25
    settings = Settings(data_dir=tmp_path, account="alice")
    store = open_store(f"{redis_url}?prefix=mochi-plog-{uuid.uuid4().hex[:8]}")
    backend = DirectBackend(settings, store, None)
    job = store.enqueue("alice", {"prompt": "p"})
    polled = threading.Event()
    read = set()

    def noted(name, real):  # the real reads; the hub's first poll has ended once it read the record and the log
        def wrapped(*args):
            try:
                return real(*args)
            finally:
                read.add(name)
                if len(read) == 2:
                    polled.set()

        return wrapped

    store.progress_since = noted("log", store.progress_since)
    backend.get = noted("record", backend.get)

    def run_the_job():  # the worker's writes, all well inside one poll interval
        polled.wait(10)
        claim = store.claim("w1", 60)
        store.progress(job.id, claim.token, stage="loading")
        for k in range(total + 1):
            store.progress(job.id, claim.token, stage="denoising", step=k, total=total)
        store.progress(job.id, claim.token, stage="decoding")
        store.complete(job.id, claim.token, artifacts={"video": "/srv/x.mp4"}, timings={}, meta={})

    async def scenario():
        hub = ProgressHub(poll_s=1.0)
        worker = threading.Thread(target=run_the_job)
        worker.start()

        async def listener():
            return [item async for item in hub.listen(backend, job.id)]

        try:
            return await asyncio.wait_for(asyncio.gather(*(listener() for _ in range(20))), 30)
        finally:
            worker.join()

    try:
        for events in asyncio.run(scenario()):
            assert [e["stage"] for e in events][:2] == ["queued", "loading"]
            assert [e["step"] for e in events if e["stage"] == "denoising"] == list(range(total + 1))
            assert [e["status"] for e in events][-2:] == ["running", "done"]
            assert events[-1]["artifacts"] == {"video": f"download/{job.id}"}  # a route, never the server path
    finally:
        store.delete("alice", job.id)
        store.close()


def test_the_notebook_handle_works_unchanged_through_the_hub_gateway(gateway, tokens, tmp_path, monkeypatch):
    """End to end through the real hub and gateway, as a notebook on the hub runs it: bob's kernel has only
    JUPYTERHUB_API_TOKEN; claiming to be alice (env or account=) changes nothing. (The example notebooks
    themselves run through this gateway in test_notebooks.py.)"""
    import ipywidgets

    from mochi_lab import JobNotFound, MochiCluster
    from mochi_lab.client.http import GatewayBackend
    from mochi_lab.video import read_frames

    monkeypatch.delenv("MOCHI_LAB_GATEWAY", raising=False)
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", tokens["bob"])
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    theirs = MochiCluster(backend=GatewayBackend(gateway.url, tokens["alice"], cache_dir=tmp_path / "alice"))
    alices = theirs.generate(unique("alice's fox"), seed=11, **TINY)
    with MochiCluster(gateway.url, account="alice") as cluster:
        assert cluster.account == "bob" and "gateway" in repr(cluster) and tokens["bob"] not in repr(cluster)
        job = cluster.generate(unique("a red fox in the snow"), seed=7, **TINY)
        path = job.result(timeout=300)
        assert path.is_file() and path.is_relative_to(tmp_path / "cache")
        assert read_frames(path).shape[:3] == (7, 32, 32)
        video = job.video
        assert isinstance(video, ipywidgets.Video) and video.value == path.read_bytes()
        assert job.thumbnail[:8] == b"\x89PNG\r\n\x1a\n"
        assert job.id in [j.id for j in cluster.jobs()]
        assert all(j.record.account == "bob" for j in cluster.jobs())
        with pytest.raises(JobNotFound):
            cluster.job(alices.id)
        with pytest.raises(JobNotFound):
            cluster.backend.artifact(alices.id, "video")
        exp = cluster.experiment(unique("sweep").replace(" ", "-"))
        runs = exp.sweep([unique("a fox"), unique("a dog")], seeds=[3], **TINY)
        assert len(runs) == 2
        assert exp.wait(300, progress=False)["done"] == 2
        df = exp.to_dataframe()
        assert len(df) == 2 and list(df["status"]) == ["done", "done"]
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", gateway.url)
    with MochiCluster() as again:
        assert again.account == "bob" and again.job(job.id).status == "done"
        assert again.job(job.id).result() == path  # the cache: same file, no second download
    assert theirs.job(alices.id).wait(300).status == "done"
    theirs.close()


def test_a_running_jobs_preview_comes_through_the_gateway_and_stays_after_a_cancel(gateway, tokens, hold):
    """A job held at denoising step 2 of 20, its first preview step (about every 10 % of the steps): 6 latent
    frames of 64x96, so 6 pictures of 12x8. (Before any preview step there is none: tests/client/backend.)"""
    import io

    from PIL import Image

    prompt = unique("a slow preview")
    gate = hold(prompt, "denoising", 2)
    body = {"params": _tiny(prompt=prompt, num_frames=31, height=64, width=96, num_inference_steps=20),
            "reuse": False}
    with gateway.client(tokens["alice"]) as alice, gateway.client(tokens["bob"]) as bob:
        job = alice.post("/generate", json=body).json()
        gate.wait_reached()
        r = alice.get(f"/preview/{job['id']}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text
        assert r.headers["cache-control"] == "no-store"
        strip = Image.open(io.BytesIO(r.content))
        assert strip.size == (12, 8) and strip_pictures(strip) == 6 and r.headers["x-preview-step"] == "2"
        assert bob.get(f"/preview/{job['id']}").status_code == 404
        status = alice.get(f"/status/{job['id']}").json()
        assert status["live"]["preview_step"] == 2 and status["live"]["elapsed_s"] > 0
        alice.post(f"/cancel/{job['id']}")
        assert wait_done(alice, job["id"])["status"] == "cancelled"
        kept = alice.get(f"/preview/{job['id']}")
        assert kept.status_code == 200 and kept.content == r.content  # its last look stays


def test_an_export_names_the_gateways_routes_and_carries_the_decodable_videos(gateway, mochi, tokens, tmp_path):
    """The experiment is opened on a view of the backend whose jobs name routes: the zip's manifest shows
    `download/<id>`, never the server's artifacts folder, and the video in it decodes."""
    import io
    import zipfile

    import av

    name = f"export-{uuid.uuid4().hex[:8]}"
    with gateway.client(tokens["alice"]) as alice:
        body = {"prompts": unique("a fox in snow"), "seeds": [3], "params": TINY}
        r = alice.post(f"/experiments/{name}/sweep", json=body)
        assert r.status_code == 200, r.text
        job_id = r.json()[0]["id"]
        assert wait_done(alice, job_id)["status"] == "done"
        r = alice.get(f"/experiments/{name}/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        manifest = json.loads(zf.read(f"{name}/manifest.json"))
        (row,) = manifest["runs"]
        assert (row["job_id"], row["video"], row["thumbnail"]) == (job_id, f"download/{job_id}", f"thumbnail/{job_id}")
        server_paths = str(mochi.backend.settings.data_dir)
        assert server_paths not in zf.read(f"{name}/manifest.json").decode()
        assert server_paths not in zf.read(f"{name}/manifest.csv").decode()
        (tmp_path / "run.mp4").write_bytes(zf.read(f"{name}/{row['file']}"))
    with av.open(str(tmp_path / "run.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == TINY["num_frames"]
