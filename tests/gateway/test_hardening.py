"""The gateway under load and hostile input (issue 24), against the real JupyterHub and real uvicorn servers.

`hardened` is a gateway over a store of its own with no pool (its jobs stay queued) and small bounds, whose
hub is reached through `CountingProxy`: the hub's own API behind a proxy that counts the token checks it
sees and can hold them. Clients are told apart by X-Forwarded-For, which uvicorn believes from 127.0.0.1
(the default `trusted_proxies`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import socket
import time
import uuid

import httpx
import pytest

from tests.support.backends import unique
from tests.support.hub_fixtures import SERVICE, Gateway, start_gateway
from tests.support.jobkit import TINY
from tests.support.ports import free_port

MAX_STREAMS, MAX_EXPERIMENTS, MAX_EXPERIMENT_BYTES = 2, 3, 8192
AUTH_FAILURES, HUB_LOOKUPS = 6, 3
GENERATE_LIMIT = 64 * 1024


def _tiny(**over):
    return {"prompt": "a cat surfing a wave", **TINY, **over}


class CountingProxy:
    """The hub's API behind a proxy: counts the `GET /user` token checks it passes on and the most it had in
    hand at once; while `holding`, keeps them waiting."""

    def __init__(self, upstream: str):
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        self.upstream = upstream.rstrip("/")
        self.user_calls = self.in_hand = self.most_in_hand = 0
        self.holding = False

        async def forward(request):
            is_check = request.url.path.endswith("/hub/api/user")
            if is_check:
                self.user_calls += 1
                self.in_hand += 1
                self.most_in_hand = max(self.most_in_hand, self.in_hand)
            try:
                while is_check and self.holding:
                    await asyncio.sleep(0.005)
                async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                    answer = await client.request(
                        request.method, self.upstream + request.url.path, params=request.query_params,
                        headers={k: v for k, v in request.headers.items() if k.lower() == "authorization"},
                        content=await request.body())
            finally:
                if is_check:
                    self.in_hand -= 1
            return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

        self.app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE"])])


@pytest.fixture(scope="module")
def counted(hub):
    proxy = CountingProxy(hub.api_url.split("/hub/api")[0])
    server = Gateway(proxy.app, free_port()).start()
    proxy.url = server.url
    yield proxy
    server.stop()


@pytest.fixture(scope="module")
def hardened(hub, counted, tmp_path_factory):
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("hardened"), account="alice")
    store = open_store(settings.store_url)
    shared = DirectBackend(settings, store, None)
    config = GatewayConfig(hub_api_url=f"{counted.url}/hub/api", hub_api_token=hub.service_token, service_name=SERVICE,
                           admin_groups=["mochi-admins"], auth_cache_s=60, events_poll_s=0.02, max_active_jobs=3,
                           max_event_streams=MAX_STREAMS, max_experiments=MAX_EXPERIMENTS,
                           max_experiment_bytes=MAX_EXPERIMENT_BYTES, auth_failures=AUTH_FAILURES,
                           hub_lookups=HUB_LOOKUPS, hub_timeout_s=120)  # a loaded machine's slow checks are no 503
    gw = Gateway(create_app(settings, backend_factory=lambda: shared, config=config), free_port()).start()
    yield gw
    gw.stop()
    store.close()


_addresses = itertools.count(1)


def _client_address() -> str:
    """A fresh client address, so that each test's failed token checks are its own."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def _raw_request(url: str, head: str, timeout: float = 30) -> bytes:
    """Send only a request's head (no body byte) and read the answer to its end."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# -- 1: authentication before any body, and every body bounded --------------------------------------
def test_a_caller_is_refused_before_its_body_is_sent(hardened, tokens):
    """The answer comes while the body has not been sent at all: nothing of it was waited for or read."""
    head = "POST /generate HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {11 * 2**20}\r\n"
    refused = _raw_request(hardened.url, head + "\r\n")
    assert refused.startswith(b"HTTP/1.1 401"), refused[:200]
    assert b'"error":"unauthorized"' in refused
    too_large = _raw_request(hardened.url, head + f"Authorization: token {tokens['alice']}\r\n\r\n")
    assert too_large.startswith(b"HTTP/1.1 413"), too_large[:200]
    assert f"at most {GENERATE_LIMIT} bytes".encode() in too_large
    with hardened.client() as anon:  # a malformed body without a token: the token is what is missing
        r = anon.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_every_body_is_bounded_by_its_route(hardened, tokens):
    big = json.dumps({"params": _tiny(prompt="x" * 100), "tags": ["t"] * 20000}).encode()
    assert len(big) > GENERATE_LIMIT
    with hardened.client(tokens["alice"]) as alice:
        r = alice.post("/generate", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json() == {"error": "too_large", "detail": r.json()["detail"]}
        assert r.json()["detail"] == f"the body of POST /generate is at most {GENERATE_LIMIT} bytes"
        chunked = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: counted as read
        r = alice.post("/generate", content=chunked, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and str(GENERATE_LIMIT) in r.json()["detail"]
        small = json.dumps({"params": _tiny(seed=1), "reuse": False}).encode()
        r = alice.post("/generate", content=iter([small[:10], small[10:]]),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text  # a chunked body within the limit reaches the route whole
        alice.delete(f"/jobs/{r.json()['id']}")
        r = alice.request("GET", "/whoami", content=b"x" * 5000)
        assert r.status_code == 413 and "GET /whoami is at most 1024 bytes" in r.json()["detail"]
        record = {"name": "big", "runs": [], "description": "d" * 3000, "tags": ["x" * 60] * 32,
                  "padding": "p" * MAX_EXPERIMENT_BYTES}
        r = alice.put("/experiments/big", json=record)
        assert r.status_code == 413 and f"at most {MAX_EXPERIMENT_BYTES} bytes" in r.json()["detail"]


# -- 2: the hub as a target ----------------------------------------------------------------------------
def test_a_flood_of_random_tokens_costs_the_hub_a_bounded_number_of_checks(hardened, counted, tokens):
    flooder, other = _client_address(), _client_address()
    before = counted.user_calls

    async def flood(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=hardened.url, trust_env=False, timeout=60,
                                     headers={"X-Forwarded-For": flooder}) as c:
            return await asyncio.gather(*(c.get("/whoami", headers={"Authorization": f"token {secrets.token_hex(16)}"})
                                          for _ in range(n)))

    answers = asyncio.run(flood(50)) + asyncio.run(flood(10))
    assert counted.user_calls - before <= AUTH_FAILURES, "every random token cost the hub a check"
    assert {r.status_code for r in answers} <= {401, 429}
    limited = [r for r in answers if r.status_code == 429]
    assert len(limited) >= len(answers) - AUTH_FAILURES
    assert all(r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1 for r in limited)
    assert f"at most {AUTH_FAILURES} per 60 s" in limited[0].json()["detail"]
    with hardened.client(tokens["bob"], headers={"X-Forwarded-For": other}) as bob:  # not locked out
        assert bob.get("/whoami").json() == {"account": "bob", "admin": False}
    repeated = secrets.token_hex(16)  # one unknown token, again and again: one check, then its cached answer
    checks = counted.user_calls
    with hardened.client(repeated, headers={"X-Forwarded-For": _client_address()}) as again:
        assert [again.get("/whoami").status_code for _ in range(5)] == [401] * 5
    assert counted.user_calls - checks == 1


def test_token_checks_in_flight_at_the_hub_are_bounded(hardened, counted):
    """Fifteen unknown tokens from fifteen clients at once: the hub is asked at most HUB_LOOKUPS at a time.
    The proxy holds the checks until the bound's worth has arrived, so that the rest are all waiting then."""
    n = 15
    counted.holding, counted.most_in_hand = True, 0
    try:
        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=hardened.url, trust_env=False, timeout=120) as c:
                calls = [asyncio.ensure_future(c.get("/whoami", headers={
                    "Authorization": f"token {secrets.token_hex(16)}", "X-Forwarded-For": _client_address()}))
                    for _ in range(n)]
                deadline = time.monotonic() + 60
                while counted.in_hand < HUB_LOOKUPS:
                    assert time.monotonic() < deadline, f"{counted.in_hand} checks reached the hub"
                    await asyncio.sleep(0.01)
                counted.holding = False
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(scenario()) == [401] * n
    finally:
        counted.holding = False
    assert counted.most_in_hand == HUB_LOOKUPS


def test_failure_limits_count_ipv6_clients_by_their_64():
    from mochi_lab.gateway.auth import FailureLimit, TooManyFailures

    limit = FailureLimit(2, 60)
    for host in ("2001:db8::1", "2001:db8::2"):
        limit.end(limit.begin(host), failed=True)
    with pytest.raises(TooManyFailures) as refused:
        limit.begin("2001:db8::ffff:1")  # the same /64
    assert refused.value.status == 429 and 0 < refused.value.retry_after <= 60
    limit.end(limit.begin("2001:db8:0:1::1"), failed=False)  # another /64
    limit.end(limit.begin("192.0.2.1"), failed=False)


def test_trusted_proxies_are_addresses_or_networks():
    from pydantic import ValidationError

    from mochi_lab.config import GatewayConfig

    assert GatewayConfig().trusted_proxies == ["127.0.0.1"]
    assert GatewayConfig(trusted_proxies="10.0.0.0/8, 127.0.0.1").trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    with pytest.raises(ValidationError, match="trusted_proxies: 'hub-proxy' is not an IP address"):
        GatewayConfig(trusted_proxies="hub-proxy")


# -- 3: per-account bounds -----------------------------------------------------------------------------
class _Stream:
    """An open event stream, its first event read; `close()` ends it."""

    def __init__(self, client: httpx.Client, job_id: str):
        self._cm = client.stream("GET", f"/events/{job_id}")
        self.response = self._cm.__enter__()
        self._lines = None
        if self.response.status_code == 200:
            self._lines = self.response.iter_lines()  # kept: closing the iterator would end the stream
            for line in self._lines:
                if line.startswith("data:"):
                    break
        else:
            self.response.read()

    @property
    def open(self) -> bool:
        return self._lines is not None

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def test_event_streams_per_account_are_capped(hardened, tokens):
    with hardened.client(tokens["alice"]) as alice, hardened.client(tokens["bob"]) as bob:
        job = alice.post("/generate", json={"params": _tiny(seed=31), "reuse": False}).json()  # stays queued
        theirs = bob.post("/generate", json={"params": _tiny(seed=32), "reuse": False}).json()
        opened = [_Stream(alice, job["id"]) for _ in range(MAX_STREAMS)]
        assert all(s.open for s in opened)
        refused = _Stream(alice, job["id"])
        assert refused.response.status_code == 429 and refused.response.json()["error"] == "quota"
        assert f"max_event_streams={MAX_STREAMS}" in refused.response.json()["detail"]
        refused.close()
        bobs = _Stream(bob, theirs["id"])  # another account's streams are its own
        assert bobs.open
        bobs.close()
        opened.pop().close()  # one closed: its slot comes back once the server sees it gone
        deadline = time.monotonic() + 30
        while not (again := _Stream(alice, job["id"])).open:
            again.close()
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.05)
        for s in [*opened, again]:
            s.close()
        alice.delete(f"/jobs/{job['id']}")
        bob.delete(f"/jobs/{theirs['id']}")


def _record(name: str, **over) -> dict:
    now = time.time()
    return {"name": name, "account": "someone-else", "description": "", "tags": [], "created_at": now,
            "updated_at": now, "runs": [], **over}


def test_experiment_records_per_account_are_capped_in_count_and_size(hardened, tokens):
    with hardened.client(tokens["erin"]) as erin, hardened.client(tokens["dave"]) as dave:
        names = [f"cap-{i}-{uuid.uuid4().hex[:6]}" for i in range(MAX_EXPERIMENTS + 1)]
        for name in names[:MAX_EXPERIMENTS]:
            assert erin.put(f"/experiments/{name}", json=_record(name)).status_code == 204
        r = erin.put(f"/experiments/{names[-1]}", json=_record(names[-1]))
        assert r.status_code == 429 and f"max_experiments={MAX_EXPERIMENTS}" in r.json()["detail"]
        assert erin.get(f"/experiments/{names[-1]}").status_code == 404
        r = erin.put(f"/experiments/{names[0]}", json=_record(names[0], description="replaced"))
        assert r.status_code == 204  # an existing name is no new experiment
        assert erin.get(f"/experiments/{names[0]}").json()["description"] == "replaced"
        r = erin.post(f"/experiments/{names[-1]}/sweep", json={"prompts": ["x"], "params": TINY})
        assert r.status_code == 429 and "max_experiments" in r.json()["detail"]  # a sweep creating one, too
        assert dave.put(f"/experiments/{names[-1]}", json=_record(names[-1])).status_code == 204  # per account

        # a sweep would grow a record past its size: refused whole, nothing queued
        before = dave.get("/counts").json()
        long_prompts = [f"prompt {i} " + "y" * 3000 for i in range(3)]
        r = dave.post(f"/experiments/{names[-1]}/sweep", json={"prompts": long_prompts, "params": TINY})
        assert r.status_code == 413 and f"max_experiment_bytes={MAX_EXPERIMENT_BYTES}" in r.json()["detail"]
        assert dave.get("/counts").json() == before
        assert dave.get(f"/experiments/{names[-1]}").json()["runs"] == []


BAD_RECORDS = {  # record fields -> the field the refusal names
    "runs": ("runs", "not a list"),
    "runs.0": ("runs.0", ["a run"]),
    "runs.0.params": ("runs.0.params", [{"key": "abcd", "params": "x"}]),
    "runs.0.params.width": ("runs.0.params", [{"key": "abcd", "params": {"prompt": "p", "width": 100}}]),
    "runs.0.key": ("runs.0.key", [{"key": "../../etc", "params": {"prompt": "p"}}]),
    "runs.0.attempt": ("runs.0.attempt", [{"key": "abcd", "params": {"prompt": "p"}, "attempt": "1"}]),
    "runs.0.job_id": ("runs.0.job_id", [{"key": "abcd", "params": {"prompt": "p"}, "job_id": "/etc/passwd"}]),
    "runs.0.params.missing": ("runs.0.params", [{"key": "abcd"}]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_malformed_experiment_record_is_refused_naming_its_field(hardened, tokens, case):
    field, runs = BAD_RECORDS[case]
    name = f"bad-{uuid.uuid4().hex[:8]}"
    with hardened.client(tokens["carol"]) as carol:
        r = carol.put(f"/experiments/{name}", json=_record(name, runs=runs))
        assert r.status_code == 422 and r.json()["error"] == "invalid", r.text
        assert f"\n  {field}:" in r.json()["detail"], r.json()["detail"]
        assert carol.get(f"/experiments/{name}").status_code == 404


def test_other_malformed_record_fields_are_refused_and_a_good_record_still_exports_and_resumes(hardened, tokens):
    name = f"good-{uuid.uuid4().hex[:8]}"
    run = {"key": "abcd0123abcd0123", "params": _tiny(seed=9, model="tiny"), "attempt": 0, "job_id": None}
    with hardened.client(tokens["carol"]) as carol:
        assert carol.put(f"/experiments/{name}", json=_record(name, runs=[run])).status_code == 204
        for field, value in (("tags", "one-tag"), ("tags", [1]), ("description", {"a": 1}), ("created_at", "now"),
                             ("name", 5), ("extra", 1)):
            r = carol.put(f"/experiments/{name}", json={**_record(name, runs=[run]), field: value})
            assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
        stored = carol.get(f"/experiments/{name}").json()
        assert stored["account"] == "carol" and stored["runs"] == [run]
        r = carol.get(f"/experiments/{name}/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        r = carol.post(f"/experiments/{name}/resume")
        assert r.status_code == 200 and len(r.json()) == 1
        carol.delete(f"/jobs/{r.json()[0]['id']}")


DEEP = "[" * 3000 + "]" * 3000
MALFORMED = [  # (content type, body)
    ("application/json", b""), ("application/json", b"{"), ("application/json", b"null"), ("application/json", b"[]"),
    ("application/json", b'"text"'), ("application/json", b"12"), ("application/json", DEEP.encode()),
    ("application/json", b'{"a": ' + DEEP.encode() + b"}"), ("application/json", b'{"x": NaN}'),
    ("application/json", b'{"x": "\\ud800"}'), ("application/json", b'{"x": ' + b"9" * 5000 + b"}"),
    ("application/json", b"\xff\xfe\x00"), ("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"a=b&c"),
    ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
]
FIELDS = [  # bodies of the right shape with wrong values: JSON objects per route
    {"params": None}, {"params": {"prompt": None}}, {"params": {"prompt": "p", "width": 10**400}},
    {"params": {"prompt": "p", "seed": -1e308}}, {"params": {"prompt": "p", "guidance_scale": 1e400}},
    {"params": {"prompt": ["p"]}}, {"params": _tiny(), "priority": "high"}, {"params": _tiny(), "tags": [{"a": 1}]},
    {"params": _tiny(), "idempotency_key": 10**30}, {"params": _tiny(), "experiment": "../x"},
    {"params": _tiny(), "reuse": "yes"}, {"params": _tiny(), "account": "bob"}, {"n": None}, {"n": 10**40},
    {"n": "3"}, {"n": [1]}, {"prompts": None}, {"prompts": [["nested"]]}, {"prompts": ["p"], "seeds": [10**30]},
    {"prompts": ["p"], "params": {"priority": [1]}}, {"prompts": ["p"], "params": {"prompts": ["q"]}},
    {"prompts": ["p"], "params": {"width": {"a": 1}}}, {"prompts": ["p"] * 30, "seeds": list(range(30))},
    {"prompts": ["p"], "params": {"num_frames": list(range(1000)), "width": list(range(1000))}},
    {"name": None, "runs": None}, {"runs": [{"key": None}]},
]


def test_no_route_answers_500_to_a_malformed_body(hardened, tokens):
    with hardened.client(tokens["carol"], headers={"X-Mochi-Lab": "1"}) as carol:  # carol: an admin
        job = carol.post("/generate", json={"params": _tiny(seed=77), "reuse": False}).json()
        name = f"mal-{uuid.uuid4().hex[:6]}"
        routes = [("POST", "/generate"), ("POST", "/workers/scale"), ("PUT", f"/experiments/{name}"),
                  ("POST", f"/experiments/{name}/sweep"), ("POST", f"/experiments/{name}/resume"),
                  ("POST", f"/cancel/{job['id']}"), ("POST", f"/rerun/{job['id']}"), ("POST", "/login"),
                  ("POST", "/logout")]  # (/workers/shutdown reads no body either; its answer is the pool's end)
        answers = []
        for method, path in routes:
            for content_type, body in MALFORMED + [("application/json", json.dumps(f).encode()) for f in FIELDS]:
                r = carol.request(method, path, content=body, headers={"Content-Type": content_type})
                answers.append((method, path, body[:60], r.status_code))
                assert r.status_code < 500, (method, path, body[:80], r.text[:300])
                if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 400:
                    assert set(r.json()) == {"error", "detail"}, r.text[:200]
        for jid in [job["id"]] + [j["id"] for j in carol.get("/jobs/carol", params={"limit": 1000}).json()]:
            carol.delete(f"/jobs/{jid}")
    assert {code for *_, code in answers} <= {200, 201, 204, 303, 400, 401, 403, 404, 405, 413, 422, 429}


# -- 4: the workers' rows --------------------------------------------------------------------------
def test_workers_status_shows_another_accounts_job_only_as_busy(gateway, tokens, hold):
    from mochi_lab import MochiCluster
    from mochi_lab.client.backend import WORKER_FIELDS
    from mochi_lab.client.http import GatewayBackend
    from mochi_lab.display.widgets.cluster_panel import ClusterPanel

    prompt = unique("alice's job on a worker")
    gate = hold(prompt, "denoising", 1)
    with gateway.client(tokens["alice"]) as alice:
        job = alice.post("/generate", json={"params": _tiny(prompt=prompt, seed=2401), "reuse": False}).json()
        try:
            gate.wait_reached()  # running, and it stays so while the rows are read
            with gateway.client(tokens["bob"]) as bob, gateway.client(tokens["carol"]) as carol:
                seen = {"alice": alice.get("/workers/status").json(), "bob": bob.get("/workers/status").json(),
                        "carol": carol.get("/workers/status").json()}
                bob_cluster = MochiCluster(backend=GatewayBackend(gateway.url, tokens["bob"]))
                panel = ClusterPanel(bob_cluster)
                rows = bob_cluster.workers()
            row = {who: next((w for w in rows_ if w.get("current_job") == job["id"]), None)
                   for who, rows_ in seen.items()}
            assert row["bob"] is None and job["id"] not in json.dumps(seen["bob"]), "bob read alice's job id"
            assert row["alice"] is not None and row["alice"]["mine"] is True
            assert row["carol"] is not None and row["carol"]["current_account"] == "alice"
            assert {"node", "node_id", "pid", "rss_bytes"} <= set(row["carol"])  # an admin sees it all
            busy = next(w for w in seen["bob"] if w["worker_id"] == row["carol"]["worker_id"])
            assert busy["state"] == "busy" and busy["current_job"] is None and busy["mine"] is False
            for who in ("alice", "bob"):  # nodes, pids and memory are an admin's
                for w in seen[who]:
                    assert set(w) <= {*WORKER_FIELDS, "current_job", "mine"}, set(w) - {*WORKER_FIELDS}
            # bob's own views keep working, and show the worker busy with someone's job, no id
            assert all(r["uptime_s"] >= 0 for r in rows) and job["id"] not in panel.table.value
            cell = next(c for c in panel.table.value.split('class="mochi-current-job"')[1:]
                        if "another account" in c)
            assert "<code" not in cell
        finally:
            alice.post(f"/cancel/{job['id']}")


# -- 5: token counts at submit -----------------------------------------------------------------------
def test_a_prompt_over_the_token_limit_is_422_at_submit_on_a_gateway_without_the_tokenizer(
        hub, mochi, test_settings, tokens, tmp_path, tiny_checkpoint):
    """The gateway's machine has no model files; it asks a worker for the tokenizer once and counts."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.params import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
    from mochi_lab.pipelines.tokens import local_tokenizer

    here = test_settings.model_copy(update={"cache_dir": tmp_path / "gateway-cache"})
    assert local_tokenizer("tiny", here.cache_dir) is None  # nothing of the model on the gateway's machine
    prompt = " ".join(f"w{i}" for i in range(400))
    counted = len(local_tokenizer("tiny", test_settings.cache_dir)(prompt).input_ids)  # the workers' count
    assert counted > MAX_PROMPT_TOKENS and len(prompt) <= MAX_PROMPT_CHARS
    shared = DirectBackend(here, mochi.backend.store, mochi.backend.pool, model="tiny")
    gw = start_gateway(hub, shared)
    try:
        with gw.client(tokens["nora"]) as nora:
            r = nora.post("/generate", json={"params": _tiny(prompt=prompt), "reuse": False})
            if r.status_code == 201:
                nora.post(f"/cancel/{r.json()['id']}")
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert f"prompt: is {counted} tokens" in detail and f"the limit is {MAX_PROMPT_TOKENS}" in detail
            r = nora.post("/generate", json={"params": _tiny(negative_prompt=prompt), "reuse": False})
            assert r.status_code == 422 and "negative_prompt:" in r.json()["detail"]
            r = nora.post("/generate", json={"params": _tiny(prompt=" ".join(f"w{i}" for i in range(60))),
                                             "reuse": False})
            assert r.status_code == 201, r.text  # within the limit: queued as ever
            nora.post(f"/cancel/{r.json()['id']}")
    finally:
        gw.stop()
