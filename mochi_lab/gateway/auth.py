"""Who is calling the gateway: decided by the server from the caller's token, never from what it sends.

* `HubAuth`: a JupyterHub token. The hub answers `GET {api_url}/user` called WITH THE USER'S token
  with the token owner's model and the token's scopes; the token must carry
  `access:services!service=<name>` (or `access:services`). The account is the hub user's name; an
  admin is a hub admin or a member of one of `admin_groups`. Answers, yes and no, are cached for
  `cache_s` seconds keyed by sha256(token) (a revoked token works at most that long), concurrent
  first uses of one token make one hub call, and at most `max_lookups` hub calls are in flight.
  A client (`FailureLimit`) with too many failed lookups gets 429 instead of a new lookup.
* `StaticTokens`: for deployments without a hub, `{sha256(token): {"account": ..., "admin": bool}}`;
  only hashes are kept, so the settings never hold a usable token.
* `ChainAuth`: static tokens first, then the hub.

Raw tokens are never logged, stored, echoed back or put in an error: only their hashes are kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mochi_lab.config import check_account

log = logging.getLogger("mochi_lab.gateway.auth")

_MAX_CACHE = 10_000


@dataclass(frozen=True)
class Identity:
    """The caller, as the server decided."""

    account: str
    admin: bool = False
    source: str = "hub"


class AuthError(Exception):
    """A refused caller: status 401 (no, bad, expired or revoked token) or 403 (not allowed)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def kind(self) -> str:
        return {401: "unauthorized", 429: "rate_limited"}.get(self.status, "forbidden")


class TooManyFailures(AuthError):
    """429: this client failed too many token checks lately; `retry_after` seconds until it may try again."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__(429, detail)
        self.retry_after = retry_after


class AuthUnavailable(Exception):
    """The identity provider (the hub) could not be asked: answer 503, cache nothing."""


class Authenticator(Protocol):
    async def identify(self, token: str, client: str | None = None) -> Identity:
        """The token's owner; `client` (the caller's address) is what failed checks are counted against."""


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token: how tokens are keyed in caches and in static settings."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_authorization(header: str | None) -> str | None:
    """The token of an `Authorization: token <t>` or `Authorization: Bearer <t>` header, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() not in ("token", "bearer") or not value or " " in value:
        return None
    return value


def _unauthorized() -> AuthError:
    return AuthError(401, "invalid, expired or revoked token")


class StaticTokens:
    """Hashed tokens from settings: `{sha256_hex: {"account": "alice", "admin": false}}` (or just an account)."""

    def __init__(self, tokens: Mapping[str, Any]):
        self._tokens: dict[str, Identity] = {}
        for digest, entry in tokens.items():
            digest = str(digest).strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("static tokens must be keyed by the sha256 hex digest of each token "
                                 "(64 hex characters), not by the token itself")
            if isinstance(entry, str):
                entry = {"account": entry}
            if not isinstance(entry, Mapping) or "account" not in entry:
                raise ValueError(f"static token {digest[:8]}...: expected {{'account': ..., 'admin': bool}}")
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise ValueError(f"static token {digest[:8]}...: admin must be true or false, got {admin!r:.40}")
            self._tokens[digest] = Identity(check_account(entry["account"]), admin, "static")

    def __len__(self) -> int:
        return len(self._tokens)

    def lookup(self, token: str) -> Identity | None:
        return self._tokens.get(hash_token(token))

    async def identify(self, token: str, client: str | None = None) -> Identity:
        found = self.lookup(token)
        if found is None:
            raise _unauthorized()
        return found


class FailureLimit:
    """At most `max_failures` failed (or still unanswered) hub lookups per client in any `window_s` seconds.

    A client is an address; IPv6 addresses count by their /64, which one host may hold whole. Tokens
    answered from the cache cost the hub nothing and are never counted or refused."""

    def __init__(self, max_failures: int, window_s: float, max_clients: int = _MAX_CACHE):
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()
        self._pending: dict[str, int] = {}

    @staticmethod
    def key(client: str) -> str:
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return client
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)

    def begin(self, client: str) -> str:
        """Admit one lookup for `client` (its key, for `end`), or raise TooManyFailures."""
        key, now = self.key(client), time.monotonic()
        failed = self._failed.get(key)
        while failed and failed[0] <= now - self.window_s:
            failed.popleft()
        if len(failed or ()) + self._pending.get(key, 0) >= self.max_failures:
            wait = failed[0] + self.window_s - now if failed else self.window_s
            raise TooManyFailures(f"too many failed token checks from this address: at most {self.max_failures} "
                                  f"per {self.window_s:g} s; try again in {math.ceil(wait)} s", wait)
        self._pending[key] = self._pending.get(key, 0) + 1
        return key

    def end(self, key: str, failed: bool) -> None:
        left = self._pending.pop(key, 1) - 1
        if left:
            self._pending[key] = left
        if failed:
            self._failed.setdefault(key, deque()).append(time.monotonic())
            self._failed.move_to_end(key)
            while len(self._failed) > self.max_clients:
                self._failed.popitem(last=False)


class HubAuth:
    """JupyterHub tokens, checked with the hub (see the module doc)."""

    def __init__(self, api_url: str, *, service_name: str, api_token: str | None = None,
                 admin_groups: Iterable[str] = (), cache_s: float = 30.0, timeout_s: float = 5.0,
                 max_lookups: int = 8, failures: FailureLimit | None = None):
        self.api_url = api_url.rstrip("/")
        self.service_name = service_name
        self._api_token = api_token  # the service's own token: only to read a user's admin flag
        self.admin_groups = frozenset(admin_groups)
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.required_scopes = frozenset({f"access:services!service={service_name}", "access:services"})
        self._cache: OrderedDict[str, tuple[float, Identity | AuthError]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self.max_lookups = max_lookups
        self.failures = failures
        self._client = None
        self._client_loop = None
        self._lookups: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never the service token
        return f"<HubAuth {self.api_url} service={self.service_name!r} cache_s={self.cache_s}>"

    def _http(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False)
            self._lookups = asyncio.Semaphore(self.max_lookups)  # a semaphore, like the client, is one loop's
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except RuntimeError:  # its loop is gone
                pass

    def forget(self, token: str | None = None) -> None:
        """Drop one token's cached answer (or all)."""
        if token is None:
            self._cache.clear()
        else:
            self._cache.pop(hash_token(token), None)

    async def identify(self, token: str, client: str | None = None) -> Identity:
        key = hash_token(token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return _unwrap(hit[1])
        pending = self._inflight.get(key)
        if pending is None:
            counted = self.failures.begin(client) if self.failures is not None and client else None
            pending = asyncio.ensure_future(self._resolve(token))
            self._inflight[key] = pending
            pending.add_done_callback(lambda f, key=key, counted=counted: self._done(key, counted, f))
        result = await asyncio.shield(pending)
        return _unwrap(result)

    def _done(self, key: str, counted: str | None, future: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if counted is not None:  # an unreachable hub (an exception) is not the client's failure
            failed = not future.cancelled() and future.exception() is None and isinstance(future.result(), AuthError)
            self.failures.end(counted, failed)

    async def _resolve(self, token: str) -> Identity | AuthError:
        key = hash_token(token)
        self._http()  # the semaphore of this loop
        try:
            await asyncio.wait_for(self._lookups.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise AuthUnavailable("the hub is busy checking other tokens; try again shortly") from None
        try:
            result: Identity | AuthError = await self._ask_hub(token)
        except AuthError as exc:
            result = exc
        finally:
            self._lookups.release()
        # both answers are cached (a random token that is bad now stays bad); an unreachable hub is not
        self._cache[key] = (time.monotonic() + self.cache_s, result)
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_CACHE:
            self._cache.popitem(last=False)
        return result

    async def _get(self, path: str, token: str):
        import httpx

        try:
            return await self._http().get(f"{self.api_url}{path}", headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as exc:
            log.warning("hub unreachable at %s: %s", self.api_url, type(exc).__name__)
            raise AuthUnavailable("the hub cannot be reached to check the token") from None

    async def _ask_hub(self, token: str) -> Identity:
        resp = await self._get("/user", token)
        if resp.status_code in (401, 403, 404):
            raise _unauthorized()
        if resp.status_code != 200:
            log.warning("hub answered %s to /user", resp.status_code)
            raise AuthUnavailable(f"the hub answered {resp.status_code} when checking the token")
        try:
            model = resp.json()
        except ValueError:
            raise AuthUnavailable("the hub's answer was not JSON") from None
        if not isinstance(model, dict) or model.get("kind", "user") != "user" or not isinstance(model.get("name"), str):
            raise AuthError(403, "only hub users may use this service")
        scopes = model.get("scopes") or []
        if not isinstance(scopes, list) or not self.required_scopes & set(scopes):
            raise AuthError(403, f"the token lacks the scope access:services!service={self.service_name}")
        name = model["name"]
        try:
            check_account(name)
        except ValueError:
            raise AuthError(403, "this hub user name cannot be used as an account") from None
        groups = model.get("groups") or []
        admin = model.get("admin") is True or bool(self.admin_groups & set(g for g in groups if isinstance(g, str)))
        if not admin and "admin" not in model and self._api_token:
            admin = await self._hub_admin_flag(name)
        return Identity(name, admin, "hub")

    async def _hub_admin_flag(self, name: str) -> bool:
        """A token scoped to the service does not show its owner's admin flag: ask with the service's token."""
        from urllib.parse import quote

        try:
            resp = await self._get(f"/users/{quote(name, safe='')}", self._api_token or "")
        except AuthUnavailable:
            return False
        if resp.status_code != 200:
            return False
        try:
            return resp.json().get("admin") is True
        except (ValueError, AttributeError):
            return False


class ChainAuth:
    """Static tokens first (no network), then the hub."""

    def __init__(self, static: StaticTokens | None, hub: HubAuth | None):
        self.static, self.hub = static, hub

    async def identify(self, token: str, client: str | None = None) -> Identity:
        if self.static is not None:
            found = self.static.lookup(token)
            if found is not None:
                return found
        if self.hub is not None:
            return await self.hub.identify(token, client)
        raise _unauthorized()

    async def aclose(self) -> None:
        if self.hub is not None:
            await self.hub.aclose()


def _unwrap(result: Identity | AuthError) -> Identity:
    if isinstance(result, AuthError):
        raise AuthError(result.status, result.detail)
    return result


__all__ = ["AuthError", "AuthUnavailable", "Authenticator", "ChainAuth", "FailureLimit", "HubAuth", "Identity",
           "StaticTokens", "TooManyFailures", "hash_token", "parse_authorization"]
