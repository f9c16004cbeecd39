"""The gateway's door: who is calling, how much body they may send, and how every error is answered.

One `Door` per app. Every route goes through it (`Door.route_class`): a route that needs a caller is
authenticated from the headers before any body byte is read, and every body is bounded by its route's limit
(413). Every error, the routes' own and the framework's, is answered by one handler (`Door.answer`) from
the wire's table (`mochi_lab.gateway.wire.ERRORS`), as `{"error": kind, "detail": sentence}`: never a
token, a store URL or a server path.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from mochi_lab.client.direct import DirectBackend
from mochi_lab.config import GatewayConfig
from mochi_lab.gateway.auth import (
    Authenticator,
    AuthError,
    AuthUnavailable,
    Identity,
    TooManyFailures,
    parse_authorization,
)
from mochi_lab.gateway.web import SESSION_COOKIE, Sessions, check_cookie_write
from mochi_lab.gateway.wire import ERRORS, KIND_OF_STATUS, error_of
from mochi_lab.model import QUEUED, RUNNING, JobNotFound, StoreError, check_job_id
from mochi_lab.store.base import active_limit_error

log = logging.getLogger("mochi_lab.gateway")

KIB = 1024
# A route that declares no body limit (`body_limit`) takes none, or a small form (a login).
DEFAULT_BODY_LIMIT = KIB
# What any authenticated route may answer before it runs: no or a bad token, not allowed, a body over its
# limit, too many failed token checks, the hub or the store unreachable.
AUTHED = (401, 403, 413, 429, 503)
JSON_BODY = (400, 422)  # a JSON body: not JSON at all (400), or not what the route takes (422)
_IDENTITY = "mochi_lab_identity"  # the request's state attribute: the caller its door identified


class ApiError(Exception):
    """An answer a route gives on purpose: its status, kind (`wire.ErrorKind`) and sentence."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def not_found(what: str = "job not found") -> ApiError:
    return ApiError(404, "not_found", what)


def invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid", detail)


def body_limit(n: int) -> dict[str, Any]:
    """A route's `openapi_extra`: the most bytes its body may have (413 above; shown in /docs)."""
    return {"x-body-limit": n}


def validation_text(exc: Any) -> str:
    """A request's validation errors as lines naming each field (the account: decided by the server)."""
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


def _depends_on(dependant: Any, call: Callable) -> bool:
    # ==, not is: `door.identify` is a bound method, a new object at each access (equal to the others)
    return any(d.call == call or _depends_on(d, call) for d in dependant.dependencies)


def _allowed(request: Request) -> str:
    """Every method the request's path answers: Starlette's 405 names only the first route's, and a path
    may have several (GET /jobs/{account} and DELETE /jobs/{job_id})."""
    methods = {m for route in request.app.router.routes if isinstance(route, Route)
               and route.matches(request.scope)[0] is not Match.NONE for m in route.methods or ()}
    return ", ".join(sorted(methods))


def error_response(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


class Door:
    """The app's caller checks and error answers, over the shared store and pool (`shared()`, started by
    `factory` on first use)."""

    def __init__(self, config: GatewayConfig, auth: Authenticator, factory: Callable[[], DirectBackend]):
        self.config, self.auth, self._factory = config, auth, factory
        self.started: DirectBackend | None = None
        self._lock = threading.Lock()
        self.sessions = Sessions(lambda: self.shared().store)

    def shared(self) -> DirectBackend:
        """The store and pool every account's backend shares."""
        if self.started is None:
            with self._lock:
                if self.started is None:
                    self.started = self._factory()
        return self.started

    # -- who is calling -----------------------------------------------------------------------------------
    async def identify(self, request: Request) -> Identity:
        """The caller, from `Authorization: token|Bearer <t>` or the page's session cookie; 401 without."""
        known = getattr(request.state, _IDENTITY, None)  # the door identified this request already
        if known is not None:
            return known
        header = request.headers.get("authorization")
        token = parse_authorization(header)
        sid = request.cookies.get(SESSION_COOKIE) if header is None else None
        if sid:  # the page's session (mochi_lab.gateway.web): it stands for a token kept server-side
            if request.method not in ("GET", "HEAD"):
                check_cookie_write(request, self.config)
            token = await self.sessions.token(sid)
            if token is None:
                raise ApiError(401, "unauthorized", "the session has ended (signed out or expired): sign in again")
        if token is None:
            raise ApiError(401, "unauthorized", "a token is required: Authorization: token <token>")
        return await self.auth.identify(token, request.client.host if request.client else None)

    def backend_for(self, account: str, *, admin: bool = False) -> DirectBackend:
        """`account`'s view of the shared store and pool, with this gateway's quotas."""
        config = self.config
        return self.shared().for_account(account, admin=admin, max_active_jobs=config.max_active_jobs,
                                         max_experiments=config.max_experiments,
                                         max_experiment_bytes=config.max_experiment_bytes)

    # Dependencies. The cheap ones are async: a sync one costs a thread-pool hop per request.
    def user_backend(self) -> Callable[..., Awaitable[DirectBackend]]:
        async def user_backend(identity: Identity = Depends(self.identify)) -> DirectBackend:
            return self.backend_for(identity.account)

        return user_backend

    def admin_only(self) -> Callable[..., Awaitable[Identity]]:
        async def admin_only(identity: Identity = Depends(self.identify)) -> Identity:
            if not identity.admin:
                raise ApiError(403, "forbidden", "this action needs an admin")
            return identity

        return admin_only

    @staticmethod
    def job_id(job_id: str) -> str:
        """A well-formed job id; a malformed one is unknown (404), as on the store."""
        try:
            return check_job_id(job_id)
        except ValueError:
            raise not_found() from None

    def check_quota(self, backend: DirectBackend, adding: int) -> None:
        """All of a batch or none: refused up front when it cannot fit (each job is checked by the store too)."""
        counts = backend.counts()
        active = counts.get(QUEUED, 0) + counts.get(RUNNING, 0)
        if active + adding > self.config.max_active_jobs:
            raise active_limit_error(backend.account, active, self.config.max_active_jobs)

    # -- every route's class: the caller and the body's size, before the route ------------------------------
    def route_class(self) -> type[APIRoute]:
        """FastAPI reads and parses a JSON body before any dependency runs, so a dependency is too late to
        refuse one; the door, before the route:

        * identifies the caller of a route that depends on `identify`, from the headers alone, so that a
          refusal is answered before any body byte is read; the route's `identify` then returns that identity;
        * refuses a body over the route's limit (`body_limit`, else DEFAULT_BODY_LIMIT) with 413, by its
          Content-Length before reading, or once the bytes read of a chunked one pass the limit.
        """
        identify = self.identify

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

    # -- the one error handler ----------------------------------------------------------------------------
    async def answer(self, request: Request, exc: Exception) -> Response:
        """Every error as `ErrorBody`: the routes' own (ApiError), the door's (AuthError), the framework's,
        and the store's and params' through the wire's table; anything else is a 500 with no detail."""
        if isinstance(exc, ApiError):
            return error_response(exc.status, exc.kind, exc.detail,
                                  {"WWW-Authenticate": "token"} if exc.status == 401 else None)
        if isinstance(exc, AuthError):
            headers = {"WWW-Authenticate": "token"} if exc.status == 401 else None
            if isinstance(exc, TooManyFailures):
                headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            return error_response(exc.status, exc.kind, exc.detail, headers)
        if isinstance(exc, AuthUnavailable):
            return error_response(503, "unavailable", str(exc))
        if isinstance(exc, RequestValidationError):
            return error_response(422, "invalid", validation_text(exc))
        if isinstance(exc, StarletteHTTPException):  # its headers too: a 405's Allow
            headers = dict(exc.headers or {})
            if exc.status_code == 405:
                headers["Allow"] = _allowed(request)
            return error_response(exc.status_code, KIND_OF_STATUS.get(exc.status_code, "error"), str(exc.detail),
                                  headers or None)
        row = error_of(exc)
        if row is not None and row.exception is StoreError:
            log.warning("store error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
            if self.started is not None and self.started.metrics:
                self.started.metrics.store_error()
            return error_response(503, "unavailable", "the job store is unavailable; try again shortly")
        if row is not None:  # a job's 404 names no id: another account's job answers as an unknown one (an
            # adapter's names the name the caller gave, and says the same of another account's)
            return error_response(row.status, row.kind, "job not found" if row.exception is JobNotFound else str(exc))
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(500, "internal", "internal error")

    def install(self, app: FastAPI) -> None:
        """`answer` as the app's handler of every error."""
        for cls in (ApiError, AuthError, AuthUnavailable, RequestValidationError, StarletteHTTPException,
                    *(row.exception for row in ERRORS), Exception):
            app.add_exception_handler(cls, self.answer)


__all__ = ["AUTHED", "DEFAULT_BODY_LIMIT", "JSON_BODY", "KIB", "ApiError", "Door", "body_limit", "error_response",
           "invalid", "not_found", "validation_text"]
