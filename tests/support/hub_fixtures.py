"""Gateway fixtures, started once per session (on first use): a real JupyterHub on 127.0.0.1 and real
gateways on uvicorn. tests/conftest.py imports them, so every test folder shares the one hub.

The hub runs from the installed `jupyterhub` package with DummyAuthenticator users alice, bob, carol (a hub
admin), dave and wendy (in the admin group `mochi-admins`) and erin, the gateway registered as the external service
`mochi-lab`, and every user granted `access:services!service=mochi-lab`. It needs no proxy: the hub's API is
called on the hub's own port, and an in-memory proxy class stands in for configurable-http-proxy.
Tokens are minted through the hub's REST API by a `minter` service with the `tokens` scope.

The service is registered for OAuth (its page's sign-in) with the `gateway` fixture's callback. Browsers
reach the hub's pages (/hub/login, /hub/api/oauth2/authorize) on the same port as its API: `Hub.public_url`.
Cookies are per host, not per port: the hub's, the gateways' and the browser's all share 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support.ports import free_port

SERVICE = "mochi-lab"
# erin keeps the pool busy in one test; wendy (an admin by group) drives the widget tests, nora the notebooks;
# gwen and gary are the backend contract suite's accounts (tests/client/backend), which it empties around each test
USERS = ("alice", "bob", "carol", "dave", "erin", "wendy", "nora", "gwen", "gary")
AUTH_CACHE_S = 1.0  # a revoked token stops working after this long


HUB_CONFIG = '''
from jupyterhub.proxy import Proxy


class NoProxy(Proxy):
    """The hub's routes, kept in memory: the tests call the hub and the gateway on their own ports."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.should_start = False
        self._routes = {{}}

    async def add_route(self, routespec, target, data):
        self._routes[routespec] = {{"routespec": routespec, "target": target, "data": data}}

    async def delete_route(self, routespec):
        self._routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self._routes)


c.JupyterHub.proxy_class = NoProxy
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {public_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{root}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{root}/cookie_secret"
c.JupyterHub.pid_file = "{root}/jupyterhub.pid"
c.JupyterHub.cleanup_servers = False
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {users!r}
c.Authenticator.admin_users = {{"carol"}}
c.JupyterHub.load_groups = {{"mochi-admins": {{"users": ["dave", "wendy"]}}}}
c.JupyterHub.services = [
    {{"name": "{service}", "url": "http://127.0.0.1:{gateway_port}", "api_token": "{service_token}",
      "oauth_client_id": "service-{service}", "oauth_no_confirm": True,
      "oauth_redirect_uri": "http://127.0.0.1:{gateway_port}/oauth_callback"}},
    {{"name": "minter", "api_token": "{minter_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "access:services!service={service}"]}},
    {{"name": "minter", "scopes": ["tokens", "admin:users", "read:users"], "services": ["minter"]}},
    {{"name": "mochi-lab-service", "scopes": ["read:users"], "services": ["{service}"]}},
]
'''


class Hub:
    def __init__(self, api_url: str, service_token: str, minter_token: str, gateway_port: int):
        self.api_url = api_url
        self.public_url = api_url.removesuffix("api")  # http://127.0.0.1:<hub port>/hub/
        self.service_token = service_token
        self.gateway_port = gateway_port
        self._minter = httpx.Client(base_url=api_url, headers={"Authorization": f"token {minter_token}"},
                                    timeout=30, trust_env=False)

    def mint(self, user: str, scopes: list[str] | None = None) -> dict:
        body = {"note": "mochi_lab gateway tests", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        r = self._minter.post(f"/users/{user}/tokens", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # token, id, scopes, ...

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        return self.mint(user, scopes)["token"]

    def revoke(self, user: str, token_id: str) -> None:
        r = self._minter.delete(f"/users/{user}/tokens/{token_id}")
        assert r.status_code == 204, r.text


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyterhub")
    hub_port, gateway_port = free_port(), free_port()
    service_token, minter_token = secrets.token_hex(32), secrets.token_hex(32)
    (root / "jupyterhub_config.py").write_text(HUB_CONFIG.format(
        public_port=free_port(), hub_port=hub_port, root=root, users=set(USERS), service=SERVICE,
        gateway_port=gateway_port, service_token=service_token, minter_token=minter_token))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    log = open(root / "hub.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(root / "jupyterhub_config.py")],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    api_url = f"http://127.0.0.1:{hub_port}/hub/api"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited {proc.returncode}:\n{(root / 'hub.log').read_text()[-4000:]}")
            try:
                if httpx.get(api_url + "/", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyterhub did not answer in 60 s:\n{(root / 'hub.log').read_text()[-4000:]}")
            time.sleep(0.2)
        yield Hub(api_url, service_token, minter_token, gateway_port)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Gateway:
    """A gateway on uvicorn in a thread, on 127.0.0.1."""

    def __init__(self, app, port: int):
        import uvicorn

        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{port}", daemon=True)

    def start(self) -> "Gateway":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, token: str | None = None, headers: dict | None = None, **kwargs) -> httpx.Client:
        headers = {**({"Authorization": f"token {token}"} if token else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, trust_env=False, **kwargs)


def gateway_config(hub: Hub, **overrides):
    """A gateway's settings with this hub (its page signs in at the hub only on the registered port)."""
    from mochi_lab.config import GatewayConfig

    return GatewayConfig(hub_api_url=hub.api_url, hub_api_token=hub.service_token, service_name=SERVICE,
                         admin_groups=["mochi-admins"], auth_cache_s=AUTH_CACHE_S, events_poll_s=0.02,
                         **overrides)


def start_gateway(hub: Hub, shared, port: int | None = None, **overrides) -> Gateway:
    """The real gateway app over `shared` (a DirectBackend: its store and pool), authenticated by this hub,
    served on `port` (a free one by default). Stop it with `.stop()`."""
    from mochi_lab.gateway.app import create_app

    app = create_app(shared.settings, backend_factory=lambda: shared, config=gateway_config(hub, **overrides))
    return Gateway(app, free_port() if port is None else port).start()


@pytest.fixture(scope="session")
def gateway(hub, mochi):
    """The gateway over the session's store and pool (`mochi`: two thread workers, no Ray), at the URL the hub
    has for the service."""
    gw = start_gateway(hub, mochi.backend, hub.gateway_port, public_hub_url=hub.public_url,
                       oauth_callback_url=f"http://127.0.0.1:{hub.gateway_port}/oauth_callback")
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def storefront(hub, tmp_path_factory):
    """A gateway over a store of its own with no pool: its jobs stay queued (quotas, the page)."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import Settings
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("storefront"), account="alice")
    store = open_store(settings.store_url)
    gw = start_gateway(hub, DirectBackend(settings, store, None), max_active_jobs=3)
    yield gw
    gw.stop()
    store.close()


@pytest.fixture(scope="session")
def tokens(hub):
    """Full tokens of each user (their own scopes, which include the service's access scope)."""
    return {user: hub.token(user) for user in USERS}


__all__ = ["AUTH_CACHE_S", "SERVICE", "USERS", "Gateway", "Hub", "gateway_config", "start_gateway"]
