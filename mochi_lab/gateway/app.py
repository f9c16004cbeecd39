"""The multi-user gateway: an HTTP front door to one store and one Ray pool (the contract: gateway_contract).

The gateway is the only client-facing component holding the store's and Ray's credentials. Each
request is authenticated (`mochi_lab.gateway.auth`: a JupyterHub token checked with the hub, or a static
hashed token); the account is the one the server resolved, never anything the client sends, and the
request is served by a `DirectBackend` bound to that account over the shared store and pool. So
another account's job answers exactly like an unknown id (404).

Door hardening: every route that needs a caller is authenticated from the headers before any body
byte is read, and every body is bounded by its route's limit (413; `door.Door`); failed token checks are
limited per client (429, `auth.FailureLimit`); a quota of queued + running jobs per account (429,
nothing queued), of open event streams and of experiment records; the pool's admission (422,
`DirectBackend.submit`, prompts counted in tokens); JSON errors that never carry a token, a store URL or
a server path; access logs without query strings; and a web page rendered with Jinja2 autoescaping
under a strict Content-Security-Policy.

`create_app(settings)` builds the ASGI app; `serve(host, port, settings)` runs it with uvicorn. The parts:

* `wire`: the route paths, the request and response models and the error table, shared with the HTTP client;
* `door`: the caller's identity, the body limits and the one error handler, in front of every route;
* `routes.pool` (health, identity, models, queue, workers), `routes.jobs` (jobs and their files),
  `routes.events` (progress streams: one store poller per job, fanned out to every listener),
  `routes.experiments`, `routes.adapters` (an account's LoRA adapters); `web` (the page, its sign-in, /docs)
  and `auth` (hub and static tokens).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import GatewayConfig, ScalingConfig, Settings
from mochi_lab.gateway.auth import Authenticator, ChainAuth, FailureLimit, HubAuth, StaticTokens
from mochi_lab.gateway.door import Door
from mochi_lab.gateway.routes import adapters, events, experiments, jobs, pool
from mochi_lab.gateway.routes.events import ProgressHub
from mochi_lab.gateway.web import behind_proxies, web_router
from mochi_lab.gateway.wire import ErrorBody, job_json

log = logging.getLogger("mochi_lab.gateway")


def authenticator(config: GatewayConfig) -> Authenticator:
    """Hub and/or static tokens, as `config` says."""
    static = StaticTokens(config.static_tokens) if config.static_tokens else None
    hub = None
    if config.hub_api_url:
        hub = HubAuth(config.hub_api_url, service_name=config.service_name,
                      api_token=config.hub_api_token.get_secret_value() if config.hub_api_token else None,
                      admin_groups=config.admin_groups, cache_s=config.auth_cache_s, max_lookups=config.hub_lookups,
                      timeout_s=config.hub_timeout_s,
                      failures=FailureLimit(config.auth_failures, config.auth_failures_window_s))
    if static is None and hub is None:
        raise ValueError("the gateway needs a hub (JUPYTERHUB_API_URL) or static tokens (MOCHI_LAB_GATEWAY_TOKENS)")
    return ChainAuth(static, hub)


def create_app(settings: Settings | None = None, *, backend_factory: Callable[[], DirectBackend] | None = None,
               auth: Authenticator | None = None, config: GatewayConfig | None = None) -> FastAPI:
    """The gateway's ASGI app.

    `backend_factory()` gives the shared store + pool (a `DirectBackend`, its account unused); by
    default `DirectBackend.start(settings, config.model)`, closed when the app stops (an injected one
    is left open). `auth` decides identities (default: from `config`: hub and/or static tokens).
    """
    settings = settings or Settings.from_env()
    config = config or GatewayConfig.from_env()
    auth = auth or authenticator(config)
    owned = backend_factory is None
    scaling = ScalingConfig.from_env() if config.autoscale else None
    factory = backend_factory or (lambda: DirectBackend.start(settings, config.model, start_pool=True, scaling=scaling))
    door = Door(config, auth, factory)
    progress = ProgressHub(config.events_poll_s, config.events_max_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(door.shared)
        try:
            yield
        finally:
            await progress.close()
            closer = getattr(auth, "aclose", None)
            if closer is not None:
                await closer()
            if owned and door.started is not None:
                door.started.close()

    prefix = config.prefix.rstrip("/")
    app = FastAPI(title="mochi_lab gateway", lifespan=lifespan, docs_url=None,  # /docs: gateway.web
                  openapi_url=f"{prefix}/openapi.json", redoc_url=None, version=API_VERSION,
                  description="Text-to-video with Mochi 1 on a shared Ray pool, per account. "
                              "Authenticate with `Authorization: token <JupyterHub token>`.")
    app.state.progress = progress
    app.state.config = config
    door.install(app)

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with `ErrorBody` among its schemas (every error answer refers to it)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ErrorBody.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for router in (pool.router(door), jobs.router(door), events.router(door, progress), experiments.router(door),
                   adapters.router(door, settings.max_adapter_bytes),
                   web_router(config, auth, door.sessions, door.identify, door.backend_for,
                              route_class=door.route_class())):
        app.include_router(router, prefix=prefix)
    return app


# The API's version in its OpenAPI document: the wire's, not the package's (a release that changes no route
# leaves the committed schema, tests/gateway/openapi.json, as it is).
API_VERSION = "1"


class _NoQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access log lines: it may carry a secret (`?token=`, OAuth's
    `?code=&state=`), and a log is read by more people than the token's owner."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):  # (client, method, path, ...)
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, its access log without query strings."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["no_query_strings"] = {"()": _NoQueryStrings}
    config["handlers"]["access"]["filters"] = ["no_query_strings"]
    return config


def serve(host: str | None = None, port: int | None = None, settings: Settings | None = None) -> None:
    """Run the gateway with uvicorn (blocking): `mochi-lab gateway [--host --port]`. The client address of a
    request through `config.trusted_proxies` is the nearest one in X-Forwarded-For that is not one of them."""
    import uvicorn

    settings = settings or Settings.from_env()
    config = GatewayConfig.from_env(host=host, port=port)
    app = create_app(settings, config=config)
    uvicorn.run(behind_proxies(app, config.trusted_proxies), host=config.host, port=config.port,
                proxy_headers=False, log_level="info", log_config=log_config())


__all__ = ["API_VERSION", "ProgressHub", "authenticator", "create_app", "job_json", "log_config", "serve"]
