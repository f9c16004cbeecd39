"""Fixtures for the backend contract suite: every `backend` test runs on the direct backend, then on the
gateway backend.

- "direct": the session's `mochi` backend (a DirectBackend over the session's SQLite store and its two
  thread workers) bound to account ann, as the gateway binds each caller (`for_account`, not an admin, with
  the gateway's default quota).
- "gateway": a GatewayBackend of hub user gwen, through the session's real gateway app (uvicorn on
  127.0.0.1, over that same store and pool), which asks the real JupyterHub who each token is.

`other` is a second account of the same kind (ben, gary). Both accounts are emptied before and after each
test (tests/support/backends.empty), so counts and lists are this test's alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mochi_lab.client.backend import Backend
from tests.support.backends import ACCOUNTS, QUOTA, empty


@pytest.fixture(params=["direct", "gateway"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_backend(kind: str, mochi, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Backend]]:
    """account -> a backend of this test's kind acting for that account."""
    opened: list[Backend] = []

    def open_(account: str) -> Backend:
        if kind == "direct":
            return mochi.backend.for_account(account, max_active_jobs=QUOTA)  # shares the session's store: never closed
        from mochi_lab.client.http import GatewayBackend

        gateway, tokens = request.getfixturevalue("gateway"), request.getfixturevalue("tokens")
        backend = GatewayBackend(gateway.url, tokens[account], cache_dir=tmp_path / "downloads")
        opened.append(backend)
        return backend

    yield open_
    for backend in opened:
        backend.close()


@pytest.fixture
def accounts(kind: str, mochi) -> Iterator[tuple[str, str]]:
    """This kind's two accounts, empty when the test starts and emptied when it ends (through the store)."""
    names = ACCOUNTS[kind]
    direct = [mochi.backend.for_account(a) for a in names]
    empty(direct)
    yield names
    empty(direct)


@pytest.fixture
def backend(accounts: tuple[str, str], open_backend: Callable[[str], Backend]) -> Backend:
    return open_backend(accounts[0])


@pytest.fixture
def other(accounts: tuple[str, str], open_backend: Callable[[str], Backend]) -> Backend:
    """Another account's backend, of the same kind."""
    return open_backend(accounts[1])


@pytest.fixture
def pool_size(mochi) -> int:
    """How many jobs run at once in the session's pool: hold that many and the next ones stay queued."""
    return len(mochi.backend.pool.workers)
