"""Fixtures for the store contract suite: every `store` test runs on SQLite and on Redis.

Redis tests use the shared server on 127.0.0.1:6379 (the `redis_url` fixture: skipped naming its install
line where none answers, failed when MOCHI_LAB_TESTS_STRICT=1), each test under its own key prefix, whose
keys are deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mochi_lab.store import Store, open_store
from mochi_lab.store.redis import RedisStore

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one backend and one namespace (file or key prefix), as separate processes would."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'store.sqlite3'}"
    else:
        base = request.getfixturevalue("redis_url")
        url = f"{base}?prefix=mochi-test-{uuid.uuid4().hex[:12]}"
    opened: list[Store] = []

    def make(max_attempts: int = 3) -> Store:
        store = open_store(url, max_attempts=max_attempts)
        opened.append(store)
        return store

    yield make
    if isinstance(opened[0] if opened else None, RedisStore):
        opened[0].drop_all()  # type: ignore[union-attr]
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()


@pytest.fixture
def backend(make_store: StoreFactory, request: pytest.FixtureRequest) -> str:
    return request.node.callspec.params["make_store"]
