"""The multi-user gateway: an HTTP front door to one store and one Ray pool (the contract: gateway_contract).

The gateway is the only client-facing component holding the store's and Ray's credentials. Each
request is authenticated (`mochi_lab.gateway.auth`: a JupyterHub token checked with the hub, or a static
hashed token); the account is the one the server resolved, never anything the client sends, and the
request is served by a `DirectBackend` bound to that account over the shared store and pool. So
another account's job answers exactly like an unknown id (404).

Door hardening: every route that needs a caller is authenticated from the headers before any body
byte is read, and every body is bounded by its route's limit (413; `door_route`); failed token checks are
limited per client (429, `hubauth.FailureLimit`); a quota of queued + running jobs per account (429,
nothing queued), of open event streams and of experiment records; the pool's admission (422,
`DirectBackend.submit`, prompts counted in tokens); JSON errors that never carry a token, a store URL or
a server path; access logs without query strings; and a web page rendered with Jinja2 autoescaping
under a strict Content-Security-Policy.

`create_app(settings)` builds the ASGI app; `serve(host, port, settings)` runs it with uvicorn.
Progress streams (`/events/{job_id}`) share one store poller per job, fanned out to every listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import tempfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import GatewayConfig, ScalingConfig, Settings
from mochi_lab.gateway.auth import (
    Authenticator,
    AuthError,
    AuthUnavailable,
    ChainAuth,
    FailureLimit,
    HubAuth,
    Identity,
    StaticTokens,
    TooManyFailures,
    parse_authorization,
)
from mochi_lab.gateway.web import SESSION_COOKIE, Sessions, behind_proxies, check_cookie_write, web_router
from mochi_lab.logs import log_repeating
from mochi_lab.model import (
    FINISHED,
    QUEUED,
    RUNNING,
    JobNotFound,
    JobRecord,
    QuotaExceeded,
    RecordTooLarge,
    StoreError,
    check_job_id,
)
from mochi_lab.params import GenerationParams, ParamsError, SubmitOptions, validate_name
from mochi_lab.store.base import QUEUE_LIST_MAX, active_limit_error

log = logging.getLogger("mochi_lab.gateway")

HIDDEN_FIELDS = ("fence", "lease_expires_at")
ROUTES = {"video": "download", "thumbnail": "thumbnail"}
KIB = 1024
# A route that declares no body limit (`body_limit`) takes none, or a small form (a login).
DEFAULT_BODY_LIMIT = KIB
_IDENTITY = "mochi_lab_identity"  # the request's state attribute: the caller its door identified


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


# -- errors ------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def _not_found(what: str = "job not found") -> ApiError:
    return ApiError(404, "not_found", what)


def _error_response(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


# -- the door: the caller identified before any body is read, and every body bounded ------------------
def body_limit(n: int) -> dict[str, Any]:
    """A route's `openapi_extra`: the most bytes its body may have (413 above; shown in /docs)."""
    return {"x-body-limit": n}


def _depends_on(dependant: Any, call: Callable) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def door_route(identify: Callable[[Request], Awaitable[Identity]]) -> type[APIRoute]:
    """The class of the gateway's routes: a door in front of each one. FastAPI reads and parses a JSON body
    before any dependency runs, so a dependency is too late to refuse one; the door, before the route:

    * identifies the caller of a route that depends on `identify`, from the headers alone, so that a
      refusal is answered before any body byte is read; the route's `identify` then returns that identity;
    * refuses a body over the route's limit (`body_limit`, else DEFAULT_BODY_LIMIT) with 413, by its
      Content-Length before reading, or once the bytes read of a chunked one pass the limit.

    What the door raises is answered by the app's exception handlers, as the route's own errors are.
    """

    class DoorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()
            limit = (self.openapi_extra or {}).get("x-body-limit", DEFAULT_BODY_LIMIT)
            needs_caller = _depends_on(self.dependant, identify)

            async def door(request: Request) -> Response:
                if needs_caller:
                    setattr(request.state, _IDENTITY, await identify(request))
                what = f"the body of {request.method} {request.url.path} is at most {limit} bytes"
                declared = request.headers.get("content-length")
                if declared is not None:
                    try:
                        size = int(declared)
                    except ValueError:
                        size = -1
                    if not 0 <= size <= limit:
                        raise HTTPException(413, what)
                read = 0

                async def counted() -> dict[str, Any]:
                    nonlocal read
                    message = await request.receive()
                    read += len(message.get("body", b""))
                    if read > limit:  # FastAPI passes an HTTPException from reading the body on as it is
                        raise HTTPException(413, what)
                    return message

                return await handler(Request(request.scope, counted))

            return door

    return DoorRoute


class _CountedStream(StreamingResponse):
    """A stream that gives its slot back when it ends, however it ends."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


# -- job JSON ----------------------------------------------------------------------------------------
def job_json(record: JobRecord) -> dict[str, Any]:
    """The record as the client may see it: no fencing internals, artifacts as route names only."""
    data = dataclasses.asdict(record)
    for name in HIDDEN_FIELDS:
        data.pop(name, None)
    data["artifacts"] = {name: f"{ROUTES[name]}/{record.id}" for name in ROUTES if name in (record.artifacts or {})}
    return data


# -- progress streams: one store poller per job, fanned out ------------------------------------------
class _Watch:
    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.cond = asyncio.Condition()
        self.listeners = 0
        self.done = False
        self.task: asyncio.Task | None = None


_LOGGED = ("status", "stage", "step", "total_steps", "message", "attempts", "live")


def _signature(view: dict[str, Any]) -> tuple:
    return tuple(view.get(k) for k in ("status", "stage", "step", "attempts"))


class ProgressHub:
    """Every change of (status, stage, step) of a job, in order, to every listener of that job.

    One poller per (account, job) reads the store every `poll_s` while anyone listens and keeps the
    changes it saw; each listener starts at the latest one and reads on at its own pace.

    The running states come from the store's progress log (`Store.progress_since`), so a step shorter
    than one poll is still delivered; a backend without a store (tests) is polled for its latest state.
    """

    def __init__(self, poll_s: float = 0.05, max_s: float = 6 * 3600.0, keepalive_s: float = 15.0):
        self.poll_s, self.max_s, self.keepalive_s = poll_s, max_s, keepalive_s
        self._watches: dict[tuple[str, str], _Watch] = {}

    def pollers(self) -> int:
        return sum(1 for w in self._watches.values() if not w.done)

    async def listen(self, backend: DirectBackend, job_id: str) -> AsyncIterator[dict[str, Any] | None]:
        """Job JSONs as they change (None: nothing new for `keepalive_s`); ends after a finished state."""
        key = (backend.account, job_id)
        watch = self._watches.get(key)
        if watch is None or watch.done:
            watch = self._watches[key] = _Watch()
            watch.task = asyncio.ensure_future(self._poll(key, watch, backend, job_id))
        watch.listeners += 1
        i = max(len(watch.history) - 1, 0)
        try:
            while True:
                idle = False
                async with watch.cond:
                    try:
                        await asyncio.wait_for(watch.cond.wait_for(lambda: len(watch.history) > i or watch.done),
                                               self.keepalive_s)
                    except asyncio.TimeoutError:
                        idle = True
                if idle:  # yield outside the lock: a slow listener must never hold up the poller
                    yield None
                    continue
                while i < len(watch.history):
                    i += 1
                    yield watch.history[i - 1]
                if watch.done and i >= len(watch.history):
                    return
        finally:
            watch.listeners -= 1

    async def _poll(self, key: tuple[str, str], watch: _Watch, backend: DirectBackend, job_id: str) -> None:
        reader = getattr(getattr(backend, "store", None), "progress_since", None)
        last: tuple | None = None
        seq, first = -1, True
        started = time.monotonic()
        deadline = started + self.max_s
        failures = 0

        async def emit(view: dict[str, Any]) -> None:
            nonlocal last
            if _signature(view) == last:
                return
            last = _signature(view)
            async with watch.cond:
                watch.history.append(view)
                watch.cond.notify_all()

        try:
            while time.monotonic() < deadline and watch.listeners > 0:
                try:
                    record = await asyncio.to_thread(backend.get, job_id)
                    entries = [] if reader is None else await asyncio.to_thread(reader, backend.account, job_id, seq)
                    failures = 0
                except JobNotFound:  # deleted while watched
                    return
                except StoreError as exc:
                    failures += 1
                    log_repeating(log, logging.WARNING, "progress poll of %s failed (%d): %s", job_id, failures,
                                  type(exc).__name__)
                    await asyncio.sleep(min(2.0, self.poll_s * 2 ** failures))
                    continue
                view = job_json(record)
                if first:  # a listener joining late starts at the job's state now, not its history
                    entries, first = ([] if record.status in FINISHED else entries[-1:]), False
                for entry in entries:  # in order
                    seq = max(seq, int(entry.get("seq", seq)))
                    await emit({**view, **{k: entry[k] for k in _LOGGED if k in entry}})
                if reader is None or record.status != RUNNING:  # the log has the running states
                    await emit(view)
                if record.status in FINISHED:
                    return
                # 5x as often where the end may be near: a job's first seconds (short jobs) and its last
                # stages, so `job.result()` sees the end soon after it happens
                near_end = record.stage in ("decoding", "encoding") or time.monotonic() - started < 2.0
                await asyncio.sleep(self.poll_s / 5 if near_end else self.poll_s)
        finally:
            async with watch.cond:
                watch.done = True
                watch.cond.notify_all()
            if self._watches.get(key) is watch:
                del self._watches[key]

    async def close(self) -> None:
        for watch in list(self._watches.values()):
            if watch.task is not None:
                watch.task.cancel()


# -- request bodies (loose on purpose: GenerationParams/SubmitOptions give the errors) ----------------
class GenerateBody(BaseModel):
    """POST /generate. `params` are GenerationParams fields; the account is never taken from a body."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any]
    priority: Any = 0
    tags: Any = Field(default_factory=list)
    experiment: Any = None
    idempotency_key: Any = None
    reuse: bool = True


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: Any


class SweepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: Any
    seeds: Any = None
    params: dict[str, Any] = Field(default_factory=dict)
    priority: Any = 0


def _validation_text(exc: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field" + ("; the account is decided by the server from the token" if loc[-1:] == ["account"]
                                     else "")
        parts.append(f"{field}: {msg}")
    return "invalid request:\n  " + "\n  ".join(parts)


# -- the app -----------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, backend_factory: Callable[[], DirectBackend] | None = None,
               auth: Authenticator | None = None, config: GatewayConfig | None = None):
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
    progress = ProgressHub(config.events_poll_s, config.events_max_s)
    state: dict[str, Any] = {"shared": None}
    start_lock = threading.Lock()

    def shared() -> DirectBackend:
        if state["shared"] is None:
            with start_lock:
                if state["shared"] is None:
                    state["shared"] = factory()
        return state["shared"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(shared)
        try:
            yield
        finally:
            await progress.close()
            closer = getattr(auth, "aclose", None)
            if closer is not None:
                await closer()
            if owned and state["shared"] is not None:
                state["shared"].close()

    prefix = config.prefix.rstrip("/")
    app = FastAPI(title="mochi_lab gateway", lifespan=lifespan, docs_url=None,  # /docs: gateway_web
                  openapi_url=f"{prefix}/openapi.json", redoc_url=None,
                  description="Text-to-video with Mochi 1 on a shared Ray pool, per account. "
                              "Authenticate with `Authorization: token <JupyterHub token>`.")
    app.state.progress = progress
    app.state.config = config

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.kind, exc.detail,
                               {"WWW-Authenticate": "token"} if exc.status == 401 else None)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError):
        headers = {"WWW-Authenticate": "token"} if exc.status == 401 else None
        if isinstance(exc, TooManyFailures):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return _error_response(exc.status, exc.kind, exc.detail, headers)

    @app.exception_handler(AuthUnavailable)
    async def _auth_unavailable(request: Request, exc: AuthUnavailable):
        return _error_response(503, "unavailable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(422, "invalid", _validation_text(exc))

    @app.exception_handler(ParamsError)
    async def _params(request: Request, exc: ParamsError):
        return _error_response(422, "invalid", str(exc))

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded):
        return _error_response(429, "quota", str(exc))

    @app.exception_handler(RecordTooLarge)
    async def _too_large(request: Request, exc: RecordTooLarge):
        return _error_response(413, "too_large", str(exc))

    @app.exception_handler(JobNotFound)
    async def _missing(request: Request, exc: JobNotFound):
        return _error_response(404, "not_found", "job not found")

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError):
        log.warning("store error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        metrics = state["shared"] and state["shared"].metrics
        if metrics:
            metrics.store_error()
        return _error_response(503, "unavailable", "the job store is unavailable; try again shortly")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kinds = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                 413: "too_large", 422: "invalid", 429: "quota", 503: "unavailable"}
        return _error_response(exc.status_code, kinds.get(exc.status_code, "error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error_response(500, "internal", "internal error")

    # -- identity -------------------------------------------------------------------------------
    sessions = Sessions(lambda: shared().store)

    async def identify(request: Request) -> Identity:
        known = getattr(request.state, _IDENTITY, None)  # the door identified this request already
        if known is not None:
            return known
        header = request.headers.get("authorization")
        token = parse_authorization(header)
        sid = request.cookies.get(SESSION_COOKIE) if header is None else None
        if sid:  # the page's session (mochi_lab.gateway.web): it stands for a token kept server-side
            if request.method not in ("GET", "HEAD"):
                check_cookie_write(request, config)
            token = await sessions.token(sid)
            if token is None:
                raise ApiError(401, "unauthorized", "the session has ended (signed out or expired): sign in again")
        if token is None:
            raise ApiError(401, "unauthorized", "a token is required: Authorization: token <token>")
        return await auth.identify(token, request.client.host if request.client else None)

    def backend_for(account: str, *, admin: bool = False) -> DirectBackend:
        return shared().for_account(account, admin=admin, max_active_jobs=config.max_active_jobs,
                                    max_experiments=config.max_experiments,
                                    max_experiment_bytes=config.max_experiment_bytes)

    # The cheap dependencies are async: a sync one costs a thread-pool hop per request.
    async def user_backend(identity: Identity = Depends(identify)) -> DirectBackend:
        return backend_for(identity.account)

    async def admin_only(identity: Identity = Depends(identify)) -> Identity:
        if not identity.admin:
            raise ApiError(403, "forbidden", "this action needs an admin")
        return identity

    def job_id_of(job_id: str) -> str:
        try:
            return check_job_id(job_id)
        except ValueError:
            raise _not_found() from None

    def check_quota(backend: DirectBackend, adding: int) -> None:
        """All of a sweep or none: refused up front when it cannot fit (each job is checked by the store too)."""
        counts = backend.counts()
        active = counts.get(QUEUED, 0) + counts.get(RUNNING, 0)
        if active + adding > config.max_active_jobs:
            raise active_limit_error(backend.account, active, config.max_active_jobs)

    # -- routes ---------------------------------------------------------------------------------
    api = APIRouter(route_class=door_route(identify))

    @api.get("/healthz", tags=["service"])
    def healthz():
        try:
            shared().store.workers()
        except StoreError:
            raise ApiError(503, "unavailable", "the job store is unavailable") from None
        return {"ok": True}

    @api.get("/whoami", tags=["service"])
    async def whoami(identity: Identity = Depends(identify)):
        return {"account": identity.account, "admin": identity.admin}

    @api.get("/models", tags=["pool"])
    def models(backend: DirectBackend = Depends(user_backend)):
        return backend.models()

    # two prompts of MAX_PROMPT_CHARS, even as JSON's \uXXXX escapes, and the rest
    @api.post("/generate", status_code=201, tags=["jobs"], openapi_extra=body_limit(64 * KIB))
    def generate(body: GenerateBody, backend: DirectBackend = Depends(user_backend)):
        params = GenerationParams.parse(**{"model": backend.model, **body.params})
        options = SubmitOptions.parse(priority=body.priority, tags=body.tags, experiment=body.experiment,
                                      idempotency_key=body.idempotency_key)
        return job_json(backend.submit(params, options, reuse=body.reuse))

    @api.get("/status/{job_id}", tags=["jobs"])
    def status(job_id: str, backend: DirectBackend = Depends(user_backend)):
        return JSONResponse(job_json(backend.get(job_id_of(job_id))))

    @api.get("/jobs/{account}", tags=["jobs"])
    def jobs(account: str, status: str | None = None, experiment: str | None = None, tag: str | None = None,
             text: str | None = None, limit: int = 50, offset: int = 0, identity: Identity = Depends(identify)):
        if account != identity.account and not identity.admin:
            raise _not_found("account not found")
        try:
            backend = backend_for(account)
        except ValueError:
            raise _not_found("account not found") from None
        from mochi_lab.model import check_status

        try:
            check_status(status)
        except ValueError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        if not 0 < limit <= 1000 or offset < 0:
            raise ApiError(422, "invalid", "limit must be 1..1000 and offset >= 0")
        return [job_json(r) for r in backend.list(status=status, experiment=experiment, tag=tag, text=text,
                                                  limit=limit, offset=offset)]

    @api.get("/counts", tags=["jobs"])
    def counts(backend: DirectBackend = Depends(user_backend)):
        return backend.counts()

    @api.post("/cancel/{job_id}", tags=["jobs"])
    def cancel(job_id: str, backend: DirectBackend = Depends(user_backend)):
        return job_json(backend.cancel(job_id_of(job_id)))

    @api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"])
    def delete(job_id: str, backend: DirectBackend = Depends(user_backend)):
        backend.delete(job_id_of(job_id))
        return Response(status_code=204)

    @api.post("/rerun/{job_id}", status_code=201, tags=["jobs"])
    def rerun(job_id: str, backend: DirectBackend = Depends(user_backend)):
        record = backend.get(job_id_of(job_id))
        options = SubmitOptions.parse(tags=[f"reproduces:{record.id}"])
        return job_json(backend.submit(GenerationParams.stored(record.params), options, reuse=False))

    def artifact(backend: DirectBackend, job_id: str, name: str) -> Path:
        job_id = job_id_of(job_id)
        try:
            return backend.artifact_path(job_id, name)
        except FileNotFoundError:  # its text may name a server path: say it in our own words
            record = backend.get(job_id)
            raise _not_found(f"job {job_id} has no {name} (status {record.status})") from None

    @api.get("/download/{job_id}", tags=["artifacts"], response_class=FileResponse)
    def download(job_id: str, backend: DirectBackend = Depends(user_backend)):
        path = artifact(backend, job_id, "video")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4",
                            content_disposition_type="inline", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/thumbnail/{job_id}", tags=["artifacts"], response_class=FileResponse)
    def thumbnail(job_id: str, backend: DirectBackend = Depends(user_backend)):
        path = artifact(backend, job_id, "thumbnail")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/preview/{job_id}", tags=["artifacts"])
    def preview(job_id: str, backend: DirectBackend = Depends(user_backend)):
        """The running (or cancelled, or failed) job's latest preview: an animated WebP, one picture per
        latent frame; 204 when it has none (yet, or any more: a done job has its video)."""
        found = backend.preview(job_id_of(job_id))
        if found is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        step, data = found
        return Response(data, media_type="image/webp", headers={"X-Preview-Step": str(step), "Cache-Control": "no-store"})

    streams: dict[str, int] = {}  # open event streams per account, in this process

    def stream_closed(account: str) -> None:
        streams[account] -= 1
        if not streams[account]:
            del streams[account]

    @api.get("/events/{job_id}", tags=["jobs"], response_class=StreamingResponse)
    async def events(job_id: str, backend: DirectBackend = Depends(user_backend)):
        job_id = job_id_of(job_id)
        await run_in_threadpool(backend.get, job_id)  # 404 before the stream starts
        account, limit = backend.account, config.max_event_streams
        if streams.get(account, 0) >= limit:
            raise ApiError(429, "quota", f"account {account} has {streams[account]} event streams open; the limit is "
                                         f"max_event_streams={limit} (close one first)")
        streams[account] = streams.get(account, 0) + 1

        async def stream():
            async for item in progress.listen(backend, job_id):
                if item is None:
                    yield ": keepalive\n\n"
                else:
                    yield f"event: progress\ndata: {json.dumps(item)}\n\n"

        return _CountedStream(stream(), release=lambda: stream_closed(account), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/queue", tags=["pool"])
    def queue(limit: int = 50, identity: Identity = Depends(identify)):
        """Every account's queued jobs in the order workers take them: the caller's own in full, others'
        by place and size only (with their account for admins)."""
        if not 0 < limit <= QUEUE_LIST_MAX:
            raise ApiError(422, "invalid", f"limit must be 1..{QUEUE_LIST_MAX}")
        return backend_for(identity.account, admin=identity.admin).queue(limit)

    @api.get("/workers/status", tags=["pool"])
    def workers(identity: Identity = Depends(identify)):
        """Every worker's state; its current job's id where the job is the caller's (any, for admins); nodes,
        pids and memory for admins only (`backend.worker_rows`)."""
        return backend_for(identity.account, admin=identity.admin).workers()

    @api.post("/workers/scale", tags=["pool"], openapi_extra=body_limit(KIB))
    def scale(body: ScaleBody, identity: Identity = Depends(admin_only)):
        n = body.n
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1024:
            raise ApiError(422, "invalid", f"n must be a whole number of workers between 0 and 1024, got {n!r:.40}")
        backend_for(identity.account).scale(n)
        log.info("pool scaled to %d by %s", n, identity.account)
        return {"ok": True}

    @api.post("/workers/shutdown", tags=["pool"])
    def shutdown(identity: Identity = Depends(admin_only)):
        backend_for(identity.account).shutdown_pool()
        log.info("pool shut down by %s", identity.account)
        return {"ok": True}

    # -- experiments ----------------------------------------------------------------------------
    def experiment_name(name: str) -> str:
        try:
            return validate_name(name)
        except ValueError:
            raise _not_found("experiment not found") from None

    def open_experiment(backend: DirectBackend, name: str, create: bool = False):
        from mochi_lab.client.experiment import Experiment

        try:
            record = backend.get_experiment(experiment_name(name))
        except KeyError:
            if not create:
                raise _not_found("experiment not found") from None
            return Experiment.open(backend, name, model=backend.model)
        return Experiment(backend, record, model=backend.model)

    @api.get("/experiments", tags=["experiments"])
    def experiments(backend: DirectBackend = Depends(user_backend)):
        return backend.list_experiments()

    @api.get("/experiments/{name}", tags=["experiments"])
    def get_experiment(name: str, backend: DirectBackend = Depends(user_backend)):
        try:
            return backend.get_experiment(experiment_name(name))
        except KeyError:
            raise _not_found("experiment not found") from None

    @api.put("/experiments/{name}", status_code=204, tags=["experiments"],
             openapi_extra=body_limit(config.max_experiment_bytes))
    async def put_experiment(name: str, request: Request, backend: DirectBackend = Depends(user_backend)):
        """Create or replace the record (`experiment.ExperimentRecord`: 422 naming the field otherwise)."""
        from mochi_lab.client.experiment import ExperimentRecord

        try:
            validate_name(name)
        except ValueError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        try:
            raw = json.loads(await request.body())
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise ApiError(422, "invalid", "the body must be a JSON object (an experiment record)") from None
        try:
            record = ExperimentRecord.model_validate(raw).model_dump()
        except ValidationError as exc:
            raise ApiError(422, "invalid", _validation_text(exc)) from None
        if record["name"] != name:
            raise ApiError(422, "invalid", "name: the record's name must equal the path's")
        record["account"] = backend.account  # forced: never the client's
        await run_in_threadpool(backend.put_experiment, record)
        return Response(status_code=204)

    # a sweep's prompts are at most max_active_jobs (its quota), each at most MAX_PROMPT_CHARS
    @api.post("/experiments/{name}/sweep", tags=["experiments"], openapi_extra=body_limit(256 * KIB))
    def sweep(name: str, body: SweepBody, backend: DirectBackend = Depends(user_backend)):
        from mochi_lab.sweep import grid_size

        try:
            validate_name(name)
            planned = grid_size(body.prompts, body.seeds, body.params)
        except (ValueError, TypeError) as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        priority = SubmitOptions.parse(priority=body.priority).priority
        check_quota(backend, planned)
        exp = open_experiment(backend, name, create=True)
        jobs = exp.sweep(body.prompts, body.seeds, priority=priority, **body.params)
        return [job_json(j.record) for j in jobs]

    @api.post("/experiments/{name}/resume", tags=["experiments"])
    def resume(name: str, backend: DirectBackend = Depends(user_backend)):
        exp = open_experiment(backend, name)
        todo = sum(n for k, n in exp.status().items() if k in ("missing", "failed", "cancelled"))
        if todo:
            check_quota(backend, todo)
        jobs = exp.resume()
        return [job_json(j.record) for j in jobs]

    @api.get("/experiments/{name}/export", tags=["experiments"])
    def export(name: str, backend: DirectBackend = Depends(user_backend)):
        exp = open_experiment(backend, name)
        exp._backend = _RoutedBackend(backend)  # the manifest names routes, never server paths
        with tempfile.TemporaryDirectory(prefix="mochi-export-") as tmp:
            folder = exp.export(Path(tmp) / name)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        zf.write(path, f"{name}/{path.relative_to(folder)}")
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    app.include_router(api, prefix=prefix)
    app.include_router(web_router(config, auth, sessions, identify, backend_for, route_class=door_route(identify)),
                       prefix=prefix)
    return app


class _RoutedBackend:
    """A user's backend whose listed jobs name artifact routes, not server paths (for exports)."""

    def __init__(self, inner: DirectBackend):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list(self, **kwargs: Any) -> list[JobRecord]:
        out = []
        for r in self._inner.list(**kwargs):
            routed = dataclasses.replace(r, artifacts={k: f"{ROUTES[k]}/{r.id}" for k in ROUTES if k in r.artifacts})
            out.append(routed)
        return out

    def save_artifact(self, job_id: str, name: str, dest: Path) -> Path:
        return self._inner.save_artifact(job_id, name, dest)


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


__all__ = ["ProgressHub", "create_app", "job_json", "serve"]
