"""The gateway's wire, from the client's side: requests with the token, JSON answers, and error answers as the
exceptions the server's side raised (the wire's table, `mochi_lab.gateway.wire.ERRORS`), or as a
`GatewayAuthError` (401/403) or a `GatewayError`. The token never appears in a repr, an error or a log line.
`GatewayBackend` (client/http.py) says what to ask; this says how.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx

from mochi_lab.adapters import AdapterRejected
from mochi_lab.config import without_credentials
from mochi_lab.gateway import wire
from mochi_lab.model import QuotaExceeded, RecordTooLarge, StoreUnavailable
from mochi_lab.params import ParamsError


class GatewayError(RuntimeError):
    """The gateway answered with an error this client has no better exception for (e.g. a 500)."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind


class GatewayAuthError(PermissionError):
    """401 (no, bad or revoked token) or 403 (token lacks the service's scope, or an admin-only action)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:  # PermissionError(msg) prints fine; keep it one clear line
        return str(self.args[0]) if self.args else "not allowed"


class _TokenAuth(httpx.Auth):
    """`Authorization: token <t>` on every request; the token is kept out of reprs."""

    def __init__(self, token: str):
        self._header = f"token {token}"

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = self._header
        yield request

    def __repr__(self) -> str:
        return "<token auth ***>"


class WireClient:
    """An httpx client for the gateway at `url` that sends `token` and follows no redirect."""

    def __init__(self, url: str, token: str | None, *, timeout: float, transport: httpx.BaseTransport | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"gateway url must start with http:// or https://, got {url!r:.80}")
        # user:password@ in the URL means nothing here (the token authenticates) and must reach no log
        self.url = without_credentials(url).rstrip("/") + "/"
        self.where = self.url
        if not token:
            raise GatewayAuthError(f"no token for the mochi_lab gateway at {self.where}: set JUPYTERHUB_API_TOKEN "
                                   "(a JupyterHub server sets it for you) or pass token=")
        self._token = token
        self.timeout = timeout
        self.client = httpx.Client(
            base_url=self.url,
            auth=_TokenAuth(token),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport or httpx.HTTPTransport(retries=1),  # retries failed connects only
            headers={"User-Agent": "mochi_lab-gateway-client"},
            follow_redirects=False,  # a redirect (e.g. to a hub login page) must not carry the token away
        )

    @contextlib.contextmanager
    def reaching(self, what: str):
        """A timeout or a broken connection while doing `what` becomes StoreUnavailable, token scrubbed."""
        try:
            yield
        except httpx.TimeoutException:
            raise StoreUnavailable(f"the mochi_lab gateway at {self.where} did not answer {what} "
                                   f"within {self.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"cannot reach the mochi_lab gateway at {self.where} ({what}): "
                                   f"{self.scrub(str(exc)) or type(exc).__name__}") from None

    def request(self, method: str, path: str, *, not_found=None, **kwargs: Any) -> httpx.Response:
        """The answer, if a success; else raises its exception (`error`). `not_found(detail)` makes a 404's."""
        with self.reaching(f"{method} /{path.split('?')[0]}"):
            response = self.client.request(method, path, **kwargs)
        if response.is_success:
            return response
        raise self.error(response, not_found)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """`request`'s answer, read as JSON: GatewayError if it is not (the URL is not the gateway's API)."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise GatewayError(f"the gateway at {self.where} answered {method} /{path} with "
                               f"{response.headers.get('content-type', 'no content type')}, not JSON "
                               "(is the URL the gateway's?)", response.status_code) from None

    def scrub(self, text: str) -> str:
        """`text` with the token replaced by ***."""
        return text.replace(self._token, "***") if len(self._token) >= 8 else text

    def error(self, response: httpx.Response, not_found) -> Exception:
        """The exception for an error answer: the wire's for its status, else GatewayAuthError or GatewayError."""
        status = response.status_code
        kind, detail = None, ""
        try:
            body = json.loads(response.read() or b"null")
            if isinstance(body, dict):
                kind = body.get("error")
                detail = body.get("detail")
                if not isinstance(detail, str):  # FastAPI's own 422s carry a list
                    detail = json.dumps(detail) if detail is not None else ""
        except (ValueError, httpx.StreamError):
            detail = ""
        detail = self.scrub(detail)[:2000]
        if status == 404 and not_found is not None:
            return not_found(detail)
        # the exception the server's side raised (gateway.wire): by its kind where the kind is a row's own
        raised = wire.RAISED_FOR_KIND.get(kind) if isinstance(kind, str) else None
        raised = raised or wire.RAISED_FOR_STATUS.get(status)
        if raised is not None:
            return raised(self._said(raised, status, detail))
        if status == 401:
            return GatewayAuthError(f"the mochi_lab gateway at {self.where} refused the token (401"
                                    f"{': ' + detail if detail else ''}); get a fresh JUPYTERHUB_API_TOKEN", status)
        if status == 403:
            return GatewayAuthError(f"not allowed by the mochi_lab gateway at {self.where} (403"
                                    f"{': ' + detail if detail else ''})", status)
        if 300 <= status < 400:  # redirects are not followed: the token must not travel elsewhere
            where = response.headers.get("location", "?").split("?")[0]
            return GatewayError(f"the mochi_lab gateway at {self.where} redirected {response.request.method} "
                                f"{response.request.url.path} to {where} (is the URL the gateway's?)", status, kind)
        if status == 404:
            return GatewayError(f"not found at the mochi_lab gateway {self.where}: "
                                f"{detail or response.request.url.path}",
                                status, kind)
        return GatewayError(f"the mochi_lab gateway at {self.where} answered {status}"
                            f"{' ' + kind if kind else ''}{': ' + detail if detail else ''}", status, kind)

    def _said(self, raised: type[Exception], status: int, detail: str) -> str:
        """The message of the exception `raised` for an error answer: the server's sentence, and where."""
        if raised is ParamsError:
            return detail or "invalid generation parameters"
        if raised is AdapterRejected:
            return detail or "adapter refused"
        if raised is QuotaExceeded:
            return f"quota reached at the mochi_lab gateway: {detail or 'too many requests'}"
        if raised is RecordTooLarge:
            return f"too large for the mochi_lab gateway at {self.where}: {detail or 'request too large'}"
        return f"the mochi_lab gateway at {self.where} is unavailable ({status}{': ' + detail if detail else ''})"

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"<WireClient {self.where}>"


__all__ = ["GatewayAuthError", "GatewayError", "WireClient"]
