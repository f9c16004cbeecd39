"""The page's sign-in, sessions and docs (mochi_lab.gateway.web), without a browser: real stores (SQLite and
the shared Redis), real uvicorn where proxies matter. The sign-in with the real hub, in Chromium, is in
test_page_browser.py.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from mochi_lab.gateway.auth import hash_token
from mochi_lab.gateway.web import CSRF_HEADER, SESSION_COOKIE, STATE_COOKIE
from tests.support.jobkit import TINY
from tests.support.ports import free_port

TOKENS = {hash_token("alice-secret"): {"account": "alice"}, hash_token("bob-secret"): {"account": "bob"}}
SITE = "http://127.0.0.1"  # the TestClient's base URL: the page's own origin
SAME = {"Origin": SITE}
EVIL = "http://evil.example"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@contextmanager
def gateway_over(store_url: str, tmp_path: Path, **config):
    """A TestClient on a gateway with static tokens (unless `config` says otherwise) over `store_url`."""
    from fastapi.testclient import TestClient

    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.store import open_store

    store = open_store(store_url)
    shared = DirectBackend(Settings(data_dir=tmp_path, account="ops"), store, None)
    app = create_app(shared.settings, backend_factory=lambda: shared, config=GatewayConfig(**{"static_tokens": TOKENS, **config}))
    try:
        with TestClient(app, base_url=SITE) as client:
            yield client
    finally:
        store.close()


@pytest.fixture
def redis_url(redis_url):
    """The shared Redis (tests/conftest.py: skipped with its install line where none answers), under a key
    prefix of this test's own, dropped afterwards."""
    from mochi_lab.store import open_store

    url = f"{redis_url}?prefix=mochi-web-{uuid.uuid4().hex[:12]}"
    yield url
    store = open_store(url)
    store.drop_all()
    store.close()


def sign_in(client, token: str = "alice-secret", **headers) -> httpx.Response:
    return client.post("/login", content=f"token={token}", follow_redirects=False, headers={**FORM, **headers})


def test_sign_in_keeps_the_token_server_side_and_sign_out_ends_the_session(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    with gateway_over(url, tmp_path) as c:
        r = sign_in(c, **SAME)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        sid = c.cookies[SESSION_COOKIE]
        # the cookie is a random id, not the token, and HttpOnly, SameSite=Lax, for the session's time
        assert "alice-secret" not in cookie and len(sid) >= 40
        assert re.search(r"(?i)httponly", cookie) and re.search(r"(?i)samesite=lax", cookie)
        assert "Max-Age=43200" in cookie and "secure" not in cookie.lower()  # plain http, no https hub
        assert c.get("/whoami").json() == {"account": "alice", "admin": False}
        page = c.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and '<strong class="account">alice</strong>' in page.text
        # it is no token: as one it is refused
        assert c.get("/whoami", headers={"Authorization": f"token {sid}"}).status_code == 401
        # the store keeps the session under the id's hash only
        with sqlite3.connect(tmp_path / "store.sqlite3") as db:
            rows = db.execute("SELECT key, data FROM sessions").fetchall()
        assert [k for k, _ in rows] == [f"session:{hash_token(sid)}"] and not any(sid in d for _, d in rows)

        # a cross-site form cannot sign the browser out
        r = c.post("/logout", headers={"Origin": EVIL}, follow_redirects=False)
        assert r.status_code == 403 and EVIL in r.json()["detail"]
        assert c.get("/whoami").status_code == 200
        r = c.post("/logout", headers=SAME, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "logout"
        assert f'{SESSION_COOKIE}=""' in r.headers["set-cookie"]  # the browser forgets it
        assert "signed out" in c.get("/logout").text
        # and the server too: the old cookie, replayed, is refused
        c.cookies.set(SESSION_COOKIE, sid)
        r = c.get("/whoami")
        assert r.status_code == 401 and "session has ended" in r.json()["detail"]
        assert c.get("/", headers={"Accept": "text/html"}, follow_redirects=False).headers["location"] == "login"
        with sqlite3.connect(tmp_path / "store.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
        # a guessed id is no better
        c.cookies.set(SESSION_COOKIE, "A" * 43)
        assert c.get("/whoami").status_code == 401


def test_cross_site_sign_ins_and_cookie_writes_are_refused_with_the_reason(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    with gateway_over(url, tmp_path) as c:
        for headers, reason in [
            ({"Origin": EVIL}, f"its Origin is '{EVIL}', not this site ({SITE})"),
            ({"Origin": "null"}, "its Origin is 'null'"),
            ({"Origin": "http://127.0.0.1.evil.example"}, "not this site"),
            ({"Origin": "https://127.0.0.1"}, "not this site"),  # another scheme is another origin
            ({"Referer": f"{EVIL}/page"}, f"its Referer is '{EVIL}'"),
            ({}, "neither an Origin nor a Referer"),
        ]:
            r = sign_in(c, **headers)
            assert r.status_code == 403 and reason in r.json()["detail"], (headers, r.text)
            assert "set-cookie" not in r.headers and SESSION_COOKIE not in c.cookies
        # without an Origin, a Referer from this site will do (older browsers, some redirects)
        assert sign_in(c, Referer=f"{SITE}/login").status_code == 303
        body = {"params": {"prompt": "x", **TINY}}
        r = c.post("/generate", json=body, headers={CSRF_HEADER: "1", "Origin": EVIL})
        assert r.status_code == 403 and "Origin" in r.json()["detail"]
        r = c.post("/generate", json=body, headers=SAME)
        assert r.status_code == 403 and CSRF_HEADER in r.json()["detail"]
        r = c.post("/generate", json=body, headers={CSRF_HEADER: "1", **SAME})
        assert r.status_code == 201 and r.json()["account"] == "alice"
        # a token caller is no browser: neither check applies, and the cookie is not looked at
        r = c.post("/generate", json=body, headers={"Authorization": "token bob-secret"})
        assert r.status_code == 201 and r.json()["account"] == "bob"
        # a bad token from the form signs nobody in
        r = sign_in(c, token="not-a-token", **SAME)
        assert r.status_code == 401 and "not-a-token" not in r.text and "set-cookie" not in r.headers


def test_sessions_are_shared_by_replicas_and_expire(tmp_path, redis_url):
    """Two gateways over one Redis (replicas): a session made at one works at the other, and signing out at
    either ends it at both. A session lasts session_s."""
    with gateway_over(redis_url, tmp_path / "a") as a, gateway_over(redis_url, tmp_path / "b") as b:
        assert sign_in(a, **SAME).status_code == 303
        sid = a.cookies[SESSION_COOKIE]
        b.cookies.set(SESSION_COOKIE, sid)
        assert b.get("/whoami").json()["account"] == "alice"
        assert b.post("/logout", headers=SAME, follow_redirects=False).status_code == 303
        assert a.get("/whoami").status_code == 401

    with gateway_over(redis_url, tmp_path / "c", session_s=3) as c:
        started = time.monotonic()
        r = sign_in(c, **SAME)
        assert "Max-Age=3" in r.headers["set-cookie"]  # the browser drops it then; the server too:
        replayed = {"Cookie": f"{SESSION_COOKIE}={c.cookies[SESSION_COOKIE]}"}
        c.cookies.clear()
        assert c.get("/whoami", headers=replayed).status_code == 200
        deadline = started + 30
        while (r := c.get("/whoami", headers=replayed)).status_code == 200:
            assert time.monotonic() < deadline, "the session outlived session_s"
            time.sleep(0.1)
        assert r.status_code == 401 and "session has ended" in r.json()["detail"], r.text
        assert time.monotonic() - started >= 3 - 0.05  # and not before its time (Redis rounds to ms)


def test_hub_sign_in_binds_its_state_to_the_browser_and_an_https_hub_makes_cookies_secure(tmp_path):
    """With a hub, GET /login sends the browser to the hub's authorize endpoint with a random state that is
    also this browser's cookie, and a PKCE challenge. A callback whose state is not this browser's, or was
    used, is refused before the hub is asked. The hub here is https: every cookie is Secure."""
    hub = "https://hub.example.org/hub/"
    config = dict(static_tokens={}, hub_api_url="http://127.0.0.1:9/hub/api", hub_api_token="service-secret",
                  public_hub_url=hub, prefix="/services/mochi-lab/")
    with gateway_over(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path, **config) as c:
        r = c.get("/services/mochi-lab/login", follow_redirects=False)
        assert r.status_code == 303
        to = urlsplit(r.headers["location"])
        assert f"{to.scheme}://{to.netloc}{to.path}" == hub + "api/oauth2/authorize"
        query = {k: v[0] for k, v in parse_qs(to.query).items()}
        assert query["client_id"] == "service-mochi-lab" and query["response_type"] == "code"
        assert query["redirect_uri"] == "/services/mochi-lab/oauth_callback"
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert "service-secret" not in r.headers["location"]
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{STATE_COOKIE}={query['state']};") and "Secure" in cookie and "HttpOnly" in cookie
        assert "Path=/services/mochi-lab/" in cookie and "Max-Age=600" in cookie

        callback = "/services/mochi-lab/oauth_callback"
        # a code and state from someone else's sign-in (login CSRF): not this browser's state
        c.cookies.clear()
        r = c.get(callback, params={"code": "attackers-code", "state": query["state"]})
        assert r.status_code == 403 and "not started by this browser" in r.json()["detail"]
        c.cookies.set(STATE_COOKIE, "another-state", path="/services/mochi-lab/")
        r = c.get(callback, params={"code": "attackers-code", "state": query["state"]})
        assert r.status_code == 403 and "not started by this browser" in r.json()["detail"]
        # this browser's, but unknown to the store (made up, or used already)
        c.cookies.set(STATE_COOKIE, "made-up", path="/services/mochi-lab/")
        r = c.get(callback, params={"code": "x", "state": "made-up"})
        assert r.status_code == 403 and "expired or was used" in r.json()["detail"]

        # the sign-in form posts to the hub's origin too: the CSP lets it; a cross-site post is refused
        r = c.get("/services/mochi-lab/logout")
        assert "form-action 'self' https://hub.example.org;" in r.headers["content-security-policy"]
        assert 'href="https://hub.example.org/hub/logout"' in r.text
        r = c.post("/services/mochi-lab/login", headers={"Origin": EVIL}, follow_redirects=False)
        assert r.status_code == 403 and "set-cookie" not in r.headers
        r = c.post("/services/mochi-lab/login", headers={"Origin": "https://hub.example.org"}, follow_redirects=False)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]


class _Server:
    """An ASGI app on a real uvicorn in a thread (127.0.0.1), run as `mochi_lab.gateway.app.serve` runs it."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, proxy_headers=False,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.mark.parametrize("trusted,secure", [(["10.0.0.0/8"], False), (["127.0.0.1"], True)])
def test_x_forwarded_proto_is_believed_only_from_trusted_proxies(tmp_path, trusted, secure):
    """The hub's proxy says https (as configurable-http-proxy forwards it behind a TLS ingress: "https,http").
    From a trusted proxy the session cookie is Secure and the page's origin is https; from anyone else the
    header changes nothing."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.gateway.web import behind_proxies
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="ops")
    store = open_store(settings.store_url)
    shared = DirectBackend(settings, store, None)
    config = GatewayConfig(static_tokens=TOKENS, trusted_proxies=trusted)
    app = behind_proxies(create_app(settings, backend_factory=lambda: shared, config=config), config.trusted_proxies)
    try:
        with _Server(app) as srv, httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", trust_env=False) as c:
            browser = f"{'https' if secure else 'http'}://127.0.0.1:{srv.port}"
            proxied = {"X-Forwarded-Proto": "https,http", "X-Forwarded-For": "203.0.113.7"}
            r = c.post("/login", content="token=alice-secret", headers={**FORM, **proxied, "Origin": browser})
            assert r.status_code == 303, r.text
            assert ("; secure" in r.headers["set-cookie"].lower()) is secure
            other = "http" if secure else "https"  # the origin the browser did not have
            r = c.post("/login", content="token=alice-secret",
                       headers={**FORM, **proxied, "Origin": f"{other}://127.0.0.1:{srv.port}"})
            assert r.status_code == 403
    finally:
        store.close()


def test_serve_trusts_the_configured_proxies(monkeypatch, tmp_path):
    """`mochi-lab gateway` runs uvicorn with proxy headers from MOCHI_LAB_GATEWAY_TRUSTED_PROXIES only."""
    import uvicorn

    from mochi_lab.config import Settings
    from mochi_lab.gateway import app as gateway

    seen = {}

    def behind_proxies(app, trusted):
        seen["trusted"] = trusted
        return app

    monkeypatch.setenv("MOCHI_LAB_GATEWAY_TOKENS", '{"%s": "alice"}' % hash_token("alice-secret"))
    monkeypatch.setenv("MOCHI_LAB_GATEWAY_TRUSTED_PROXIES", "10.1.0.0/16, 127.0.0.1")
    monkeypatch.setattr(gateway, "behind_proxies", behind_proxies)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    gateway.serve(settings=Settings(data_dir=tmp_path, account="ops"))
    assert seen["trusted"] == ["10.1.0.0/16", "127.0.0.1"]
    assert seen["proxy_headers"] is False  # uvicorn's own (forwarded_allow_ips) would trust 127.0.0.1 anyway


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        if tag == "script" and "src" not in attrs:
            assert attrs.get("nonce"), "an inline script without the response's nonce"
            self.inline_scripts += 1


def test_docs_are_served_by_the_gateway_under_a_csp(tmp_path):
    """/docs names no other origin; every file it loads comes from the gateway (pinned package files); the
    page has a CSP that allows nothing else."""
    import importlib.resources

    prefix = "/services/mochi-lab/"
    with gateway_over(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path, prefix=prefix) as c:
        r = c.get(prefix + "docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self' 'nonce-" in csp
        assert not re.search(r"https?:|//", csp) and "unsafe" not in csp
        refs = _Refs()
        refs.feed(r.text)
        assert refs.inline_scripts == 1 and len(refs.refs) == 3, refs.refs
        static = importlib.resources.files("fastapi_offline") / "static"
        for ref in refs.refs:
            assert not urlsplit(ref).scheme and not ref.startswith("//"), ref  # this origin only
            url = urljoin(SITE + prefix + "docs", ref)
            assert urlsplit(url).path.startswith(prefix + "docs/assets/")
            asset = c.get(url)
            assert asset.status_code == 200, url
            assert asset.content == (static / Path(url).name).read_bytes()
            assert asset.headers["x-content-type-options"] == "nosniff"
        assert re.search(r'SwaggerUIBundle\(\{url: "openapi.json"', r.text)
        assert c.get(prefix + "openapi.json").status_code == 200
        for name in ("redoc.standalone.js", "..%2F__init__.py", "missing.js"):
            assert c.get(f"{prefix}docs/assets/{name}").status_code == 404


def test_gateway_settings_of_the_sign_in_are_checked():
    from pydantic import ValidationError

    from mochi_lab.config import GatewayConfig

    with pytest.raises(ValidationError, match="trusted_proxies: 'proxy.local' is not an IP address or CIDR"):
        GatewayConfig(trusted_proxies="127.0.0.1, proxy.local")
    with pytest.raises(ValidationError, match="must be a URL or path under the service prefix /services/mochi-lab/"):
        GatewayConfig(prefix="/services/mochi-lab/", oauth_callback_url="https://hub.example.org/oauth_callback")
    config = GatewayConfig(prefix="/services/mochi-lab/", trusted_proxies="10.0.0.0/8,127.0.0.1",
                           oauth_scopes='["access:services!service=mochi-lab"]')
    assert config.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    assert (config.client_id, config.callback_url) == ("service-mochi-lab", "/services/mochi-lab/oauth_callback")
    assert config.oauth_scopes == ["access:services!service=mochi-lab"]


def test_the_public_hub_url_comes_from_jupyterhub_host_when_not_given(monkeypatch):
    from mochi_lab.config import GatewayConfig

    monkeypatch.setenv("JUPYTERHUB_HOST", "https://hub.example.org")
    monkeypatch.setenv("JUPYTERHUB_BASE_URL", "/lab-hub/")
    assert GatewayConfig.from_env().public_hub_url == "https://hub.example.org/lab-hub/hub/"
    monkeypatch.setenv("JUPYTERHUB_PUBLIC_HUB_URL", "https://other.example.org/hub/")
    assert GatewayConfig.from_env().public_hub_url == "https://other.example.org/hub/"


def test_starting_sign_ins_without_a_token_writes_nothing_and_forged_states_are_refused(tmp_path):
    """GET /login needs no token, so it must cost the store nothing: its state and PKCE verifier are MACs
    under the service's secret. A state this gateway did not make, or one older than 10 minutes, is refused
    before the hub is asked."""
    from mochi_lab.config import GatewayConfig
    from mochi_lab.gateway.web import LOGIN_S, HubOAuth

    config = dict(static_tokens={}, hub_api_url="http://127.0.0.1:9/hub/api", hub_api_token="service-secret",
                  public_hub_url="http://127.0.0.1/hub/", prefix="/services/mochi-lab/")
    db = tmp_path / "store.sqlite3"
    with gateway_over(f"sqlite:///{db}", tmp_path, **config) as c:
        states = set()
        for _ in range(200):
            r = c.get("/services/mochi-lab/login", follow_redirects=False)
            assert r.status_code == 303
            states.add(parse_qs(urlsplit(r.headers["location"]).query)["state"][0])
        assert len(states) == 200
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from sessions").fetchone()[0] == 0

        callback = "/services/mochi-lab/oauth_callback"
        state = states.pop()
        issued, nonce, mac = state.split(".")
        old = f"{int(issued) - LOGIN_S - 5}.{nonce}.{mac}"  # an old time under a MAC that no longer matches
        for forged in (f"{issued}.{nonce}.{'A' * len(mac)}", old, f"{issued}.{nonce}", "made-up"):
            c.cookies.clear()
            c.cookies.set(STATE_COOKIE, forged, path="/services/mochi-lab/")
            r = c.get(callback, params={"code": "x", "state": forged})
            assert r.status_code == 403 and "expired or was used" in r.json()["detail"], forged

    oauth = HubOAuth(GatewayConfig(**config))
    state, verifier = oauth.begin()
    assert oauth.verifier(state) == verifier and len(verifier) == 43  # PKCE: 43 to 128 characters
    assert HubOAuth(GatewayConfig(**{**config, "hub_api_token": "another-secret"})).verifier(state) is None
    issued, rest = state.split(".", 1)
    body = f"{int(issued) - LOGIN_S - 5}.{rest.rsplit('.', 1)[0]}"
    expired = f"{body}.{oauth._mac('state', body)}"  # a genuine state, made 10 minutes and 5 s ago
    assert oauth.verifier(expired) is None
