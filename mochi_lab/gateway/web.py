"""The gateway's web side: its page, the page's sign-in, server-side sessions and the API docs.

Sign-in. With a hub, the page signs in as JupyterHub services do (the OAuth code flow of
`jupyterhub.services.auth.HubOAuth`): GET /login sends the browser to the hub's
/hub/api/oauth2/authorize with a `state` that is also put in a cookie of this browser, and a
PKCE challenge (state and verifier are MACs under the service's secret: nothing is stored before the
callback, so unauthenticated sign-in starts cost the store nothing); the hub sends it back to the callback (`GatewayConfig.callback_url`) with a code,
which is taken only with the same browser's state cookie and exchanged at the hub's token endpoint
(the service's token is the client secret). The access token's owner, read from the hub's /user as
for any API token (`mochi_lab.gateway.auth`), is the account. Without a hub (static tokens only), a form
takes a token instead.

Sessions. The browser's cookie holds only a random id. The store (shared by every gateway replica:
Redis, or SQLite on one machine) keeps, under sha256(id), the token the session stands for, for
`GatewayConfig.session_s` at most (less when the hub's token expires sooner). Each request re-checks
that token with the hub through the auth cache, so a token the hub revoked (the user signed out of
the hub, was deleted) ends the session within `auth_cache_s`. Signing out deletes the session: the
old cookie, replayed, is refused.

Writes. Every state-changing request the browser can send with the session cookie (sign in, sign
out, any cookie-authenticated write) must come from this site: its Origin (or, without one, its
Referer) must be the page's own origin or the hub's public one, and cookie-authenticated API writes
must also carry the header `x-mochi-lab: 1`, which no cross-site form can set. The cookies are
HttpOnly, SameSite=Lax (the hub's redirect back may follow a sign-in at another site, such as the
hub's identity provider) and Secure whenever the hub's public URL is https or the request came over
https (X-Forwarded-Proto is believed only from `trusted_proxies`: `behind_proxies`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from mochi_lab.config import GatewayConfig
from mochi_lab.gateway.auth import Authenticator, AuthError, AuthUnavailable, Identity, hash_token
from mochi_lab.gateway.wire import errors
from mochi_lab.lora_refs import lora_label
from mochi_lab.model import FINISHED, JobRecord, job_row
from mochi_lab.store.base import Store

SESSION_COOKIE = "mochi-lab-session"
STATE_COOKIE = "mochi-lab-oauth-state"
CSRF_HEADER = "x-mochi-lab"  # cookie-authenticated writes must carry it (a cross-site form cannot)
LOGIN_S = 600  # a sign-in at the hub must come back within this
# Swagger UI, from the pinned PyPI package fastapi-offline (MIT; Swagger UI itself is Apache-2.0)
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


# -- sessions --------------------------------------------------------------------------------------
class Sessions:
    """Sign-in sessions in the shared store, keyed by sha256 of the browser's secret."""

    def __init__(self, store: Callable[[], Store]):
        self._store = store

    async def _call(self, method: str, *args: Any) -> Any:
        return await run_in_threadpool(getattr(self._store(), method), *args)

    async def create(self, token: str, ttl_s: float) -> str:
        """A new session standing for `token`; returns its id (the cookie's value)."""
        sid = secrets.token_urlsafe(32)
        await self._call("put_session", "session:" + hash_token(sid), {"token": token}, ttl_s)
        return sid

    async def token(self, sid: str) -> str | None:
        data = await self._call("get_session", "session:" + hash_token(sid))
        return data.get("token") if data else None

    async def end(self, sid: str) -> None:
        await self._call("take_session", "session:" + hash_token(sid))



# -- where a request comes from ----------------------------------------------------------------------
def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def check_origin(request: Request, config: GatewayConfig) -> None:
    """403 unless the request's Origin (or Referer, without one) is this site's: the page's origin as the
    browser sees it, or the hub's public one."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    allowed = {own, _origin(config.public_hub_url or "")} - {""}
    sent, source = request.headers.get("origin"), "Origin"
    if sent is None and request.headers.get("referer"):
        sent, source = _origin(request.headers["referer"]), "Referer"
    if sent is None:
        raise AuthError(403, "cross-site request refused: it has neither an Origin nor a Referer header "
                             "(a browser sends one with every write from this site)")
    if sent.lower() not in allowed:
        raise AuthError(403, f"cross-site request refused: its {source} is {sent!r:.100}, not this site ({own})")


def check_cookie_write(request: Request, config: GatewayConfig) -> None:
    """A write authenticated by the session cookie: from this site, and with the page's header."""
    check_origin(request, config)
    if request.headers.get(CSRF_HEADER) != "1":
        raise AuthError(403, f"a cookie-authenticated write needs the header {CSRF_HEADER}: 1")


def _secure(request: Request, config: GatewayConfig) -> bool:
    return urlsplit(config.public_hub_url or "").scheme == "https" or request.url.scheme == "https"


def behind_proxies(app: Any, trusted_proxies: list[str]) -> Any:
    """`app` with the browser's scheme and address from X-Forwarded-Proto/-For when, and only when, the
    connection comes from one of `trusted_proxies` (uvicorn's ProxyHeadersMiddleware; run uvicorn with
    proxy_headers=False).

    X-Forwarded-Proto is cut to its first value first: configurable-http-proxy (the hub's proxy) appends
    its own hop ("https,http" behind a TLS ingress), which uvicorn would ignore whole."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    inner = ProxyHeadersMiddleware(app, trusted_hosts=trusted_proxies)

    async def first_proto(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope, headers=[(k, v.split(b",", 1)[0].strip() if k == b"x-forwarded-proto" else v)
                                         for k, v in scope["headers"]])
        await inner(scope, receive, send)

    return first_proto


# -- the hub's OAuth ---------------------------------------------------------------------------------
class HubOAuth:
    """The OAuth2 code flow against the hub's /hub/api/oauth2/authorize and /hub/api/oauth2/token."""

    def __init__(self, config: GatewayConfig, timeout_s: float = 10.0):
        if not config.hub_api_url or config.hub_api_token is None:
            raise ValueError("the page's sign-in with the hub needs JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN "
                             "(the service's token is its OAuth client secret)")
        self.client_id, self.redirect_uri = config.client_id, config.callback_url
        self.scopes = config.oauth_scopes
        self.authorize = (config.public_hub_url or "/hub/").rstrip("/") + "/api/oauth2/authorize"
        self.token_url = config.hub_api_url.rstrip("/") + "/oauth2/token"
        self._secret = config.hub_api_token.get_secret_value()
        self._key = hashlib.sha256(b"mochi-lab sign-in\0" + self._secret.encode()).digest()
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never the secret
        return f"<HubOAuth {self.client_id} -> {self.authorize}>"

    def _mac(self, purpose: str, text: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def begin(self) -> tuple[str, str]:
        """A new sign-in's (state, PKCE verifier). Both derive from the service's secret (every replica has
        it), so starting a sign-in writes nothing: a flood of unauthenticated /login costs no store space."""
        body = f"{int(time.time())}.{secrets.token_urlsafe(24)}"
        state = f"{body}.{self._mac('state', body)}"
        return state, self._mac("pkce", state)

    def verifier(self, state: str) -> str | None:
        """The PKCE verifier of a sign-in this service began less than LOGIN_S ago; None for any other state.
        A code is taken once by the hub, so a replayed callback fails there."""
        body, _, mac = state.rpartition(".")
        issued = body.partition(".")[0]
        if not (body and issued.isdigit() and hmac.compare_digest(mac.encode(), self._mac("state", body).encode())):
            return None
        if not 0 <= time.time() - int(issued) <= LOGIN_S:
            return None
        return self._mac("pkce", state)

    def authorize_url(self, state: str, verifier: str) -> str:
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        query = {"client_id": self.client_id, "redirect_uri": self.redirect_uri, "response_type": "code",
                 "state": state, "code_challenge": challenge, "code_challenge_method": "S256"}
        if self.scopes:
            query["scope"] = " ".join(self.scopes)
        return f"{self.authorize}?{urlencode(query)}"

    async def exchange(self, code: str, verifier: str) -> tuple[str, float | None]:
        """(access token, seconds it lasts or None) for a code the hub gave this client."""
        import httpx

        form = {"client_id": self.client_id, "client_secret": self._secret, "grant_type": "authorization_code",
                "code": code, "redirect_uri": self.redirect_uri, "code_verifier": verifier}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False) as client:
                resp = await client.post(self.token_url, data=form)
        except httpx.HTTPError:
            raise AuthUnavailable("the hub cannot be reached to finish the sign-in") from None
        if resp.status_code in (400, 401, 403):
            raise AuthError(403, "the hub refused the sign-in code (expired, used, or not this service's): sign in again")
        try:
            reply = resp.json() if resp.status_code == 200 else None
            token = reply["access_token"]
            assert isinstance(token, str) and token
        except (ValueError, KeyError, TypeError, AssertionError):
            raise AuthUnavailable(f"the hub answered {resp.status_code} without a token to the sign-in") from None
        expires = reply.get("expires_in")
        return token, float(expires) if isinstance(expires, (int, float)) and expires > 0 else None


def _see_other(where: str) -> dict[str, Any]:
    return {"description": f"See Other: {where}", "headers": {"Location": {"schema": {"type": "string"}}}}


_AUTHED = (401, 403, 413, 429, 503)  # as every API route's (mochi_lab.gateway.door.AUTHED)


# -- pages -----------------------------------------------------------------------------------------
def page_headers(nonce: str, form_action: str = "'self'") -> dict[str, str]:
    """The page's security headers: scripts and styles only with this response's nonce."""
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                    f"img-src 'self'; media-src 'self'; connect-src 'self'; form-action {form_action}; "
                                    "base-uri 'none'; frame-ancestors 'self'"),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def docs_headers(nonce: str) -> dict[str, str]:
    """The docs page's: Swagger UI's own files from this origin, its start script by nonce."""
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self'; "
                                    "img-src 'self' data:; connect-src 'self'; form-action 'none'; "
                                    "base-uri 'none'; frame-ancestors 'self'"),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _page_job(r: JobRecord) -> dict[str, Any]:
    """A job as the page shows it: plain values from its row (`model.job_row`), every one escaped by the template."""
    from mochi_lab.display.progress import progress_view

    row = job_row(r)
    return {
        **{k: row[k] for k in ("id", "status", "stage", "step", "prompt", "negative_prompt", "tags", "experiment",
                               "seed", "model", "error")},
        "total": row["total_steps"], "bar": progress_view(r),
        "size": f"{row['width']}x{row['height']}, {row['num_frames']} frames, {row['num_inference_steps']} steps",
        "lora": lora_label(row["lora"]) if row["lora"] else None,
        "finished": r.status in FINISHED, "video": row["video"] is not None,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)) if r.created_at else "",
    }


def _page_adapter(record: dict[str, Any]) -> dict[str, Any]:
    """An adapter as the page lists it: its name, model, rank, size and the start of its sha256."""
    size = record.get("bytes")
    return {"name": record.get("name"), "model": record.get("model"), "rank": record.get("rank"),
            "size": f"{size / 2**20:.1f} MiB" if isinstance(size, int) and size >= 2**20 else
                    f"{size / 1024:.0f} KiB" if isinstance(size, int) else "",
            "sha": str(record.get("sha256") or "")[:12]}


def web_router(config: GatewayConfig, auth: Authenticator, sessions: Sessions,
               identify: Callable[[Request], Awaitable[Identity]], backend_for: Callable[..., Any],
               route_class: type[APIRoute] = APIRoute) -> APIRouter:
    """The page (GET /), its sign-in and sign-out, and /docs, for `create_app` to include under the prefix."""
    from mochi_lab.display.reprs import render

    router = APIRouter(route_class=route_class)  # the gateway's door: bounded bodies
    with_hub = config.hub_api_url is not None  # else the token form (static tokens only)
    oauth = HubOAuth(config) if with_hub and config.hub_api_token is not None else None
    no_oauth = "signing in is unavailable: the gateway has no service token for the hub (JUPYTERHUB_API_TOKEN)"
    hub_origin = _origin(config.public_hub_url or "")
    login_form_action = f"'self' {hub_origin}" if hub_origin else "'self'"  # the sign-in form goes on to the hub

    def cookie(resp: Response, request: Request, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(name, value, max_age=max_age, path=config.prefix, httponly=True, samesite="lax",
                        secure=_secure(request, config))

    def login_page(status: int = 200, error: str | None = None, signed_out: bool = False) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        html = render("login.html", nonce=nonce, error=error, signed_out=signed_out,
                      mode="hub" if with_hub else "token",
                      hub_url=(config.public_hub_url or "/hub/").rstrip("/") + "/")
        return HTMLResponse(html, status_code=status, headers=page_headers(nonce, login_form_action))

    async def start_hub_login(request: Request) -> Response:
        if oauth is None:
            return login_page(503, no_oauth)
        state, verifier = oauth.begin()
        resp = RedirectResponse(oauth.authorize_url(state, verifier), status_code=303)
        cookie(resp, request, STATE_COOKIE, state, LOGIN_S)
        return resp

    async def signed_in(request: Request, token: str, ttl_s: float) -> Response:
        """A new session for `token` (never an old id: no fixation); the browser's last one ends."""
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            await sessions.end(old)
        sid = await sessions.create(token, ttl_s)
        resp = RedirectResponse(config.prefix, status_code=303)
        cookie(resp, request, SESSION_COOKIE, sid, int(ttl_s))
        return resp

    @router.get("/", response_class=HTMLResponse, tags=["web"],
                responses={303: _see_other("a browser with no session: to the sign-in"), **errors(*_AUTHED)})
    async def page(request: Request):
        try:
            identity = await identify(request)
        except Exception as exc:  # AuthError, or the gateway's ApiError for no token at all
            if "text/html" in request.headers.get("accept", "") and getattr(exc, "status", None) == 401:
                return RedirectResponse("login", status_code=303)
            raise
        backend = backend_for(identity.account)
        records = await run_in_threadpool(backend.list, limit=50)
        counts = await run_in_threadpool(backend.counts)
        adapters = [_page_adapter(a) for a in await run_in_threadpool(backend.adapters)]
        nonce = secrets.token_urlsafe(16)
        html = render("page.html", account=identity.account, admin=identity.admin, jobs=[_page_job(r) for r in records],
                      counts=counts, nonce=nonce, models=backend.models(), default_model=backend.model,
                      max_active_jobs=config.max_active_jobs, csrf_header=CSRF_HEADER, adapters=adapters)
        return HTMLResponse(html, headers=page_headers(nonce))

    @router.get("/login", response_class=HTMLResponse, tags=["web"],
                responses={303: _see_other("with a hub: to its sign-in"), **errors(413, 503, html=(503,))})
    async def login_start(request: Request):
        """With a hub: off to the hub's sign-in. Without: the token form."""
        return await start_hub_login(request) if with_hub else login_page()

    @router.post("/login", status_code=303, response_class=RedirectResponse, tags=["web"],
                 responses={303: _see_other("signed in: to the page (with a hub: to its sign-in)"),
                            **errors(401, 403, 413, 429, 503, html=(401, 403, 429, 503))})
    async def login(request: Request):
        check_origin(request, config)
        if with_hub:
            return await start_hub_login(request)
        raw = await request.body()
        token = (parse_qs(raw[:8192].decode("utf-8", "replace")).get("token") or [""])[0].strip()
        try:
            if not token:
                raise AuthError(401, "enter a token")
            await auth.identify(token)
        except AuthError as exc:
            return login_page(exc.status, exc.detail)
        return await signed_in(request, token, config.session_s)

    # the callback's path, under the prefix the router is included with (GatewayConfig checks it is)
    @router.get(urlsplit(config.callback_url).path[len(config.prefix) - 1:], include_in_schema=False)
    async def oauth_callback(request: Request, code: str = "", state: str = "", error: str = ""):
        if oauth is None:
            return login_page(503, no_oauth)
        if error:
            raise AuthError(403, f"the hub did not sign you in ({error:.100}): sign in again")
        mine = request.cookies.get(STATE_COOKIE, "")
        if not (code and state and mine and hmac.compare_digest(state.encode(), mine.encode())):
            raise AuthError(403, "this sign-in was not started by this browser (its state does not match): sign in again")
        verifier = oauth.verifier(state)
        if verifier is None:
            raise AuthError(403, "this sign-in expired or was used already: sign in again")
        token, expires_s = await oauth.exchange(code, verifier)
        await auth.identify(token)  # the hub's user, with this service's scope
        resp = await signed_in(request, token, min(config.session_s, expires_s or config.session_s))
        resp.delete_cookie(STATE_COOKIE, path=config.prefix)
        return resp

    @router.get("/logout", response_class=HTMLResponse, tags=["web"], responses=errors(413))
    def signed_out():
        return login_page(signed_out=True)

    @router.post("/logout", status_code=303, response_class=RedirectResponse, tags=["web"],
                 responses={303: _see_other("signed out: to the signed-out page"), **errors(403, 413, 503)})
    async def logout(request: Request):
        check_origin(request, config)
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            await sessions.end(sid)
        resp = RedirectResponse("logout", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path=config.prefix)
        return resp

    # -- API docs: Swagger UI from a pinned package, on this origin, under a CSP ----------------------
    @router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(render("docs.html", nonce=nonce), headers=docs_headers(nonce))

    @router.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str):
        if name not in DOCS_ASSETS:
            return Response(status_code=404)
        path = importlib.resources.files("fastapi_offline") / "static" / name
        return FileResponse(str(path), media_type=DOCS_ASSETS[name],
                            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})

    return router


__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "STATE_COOKIE",
    "HubOAuth",
    "Sessions",
    "behind_proxies",
    "check_cookie_write",
    "check_origin",
    "page_headers",
    "web_router",
]
