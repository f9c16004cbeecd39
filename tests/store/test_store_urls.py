"""Opening stores from urls: where the data goes and which options reach the backend."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from mochi_lab.config import Settings
from mochi_lab.model import StoreUnavailable
from mochi_lab.store import open_store
from mochi_lab.store.redis import RedisStore
from mochi_lab.store.sqlite import SQLiteStore


def test_sqlite_url_forms_create_one_wal_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "store.sqlite3"
    three = open_store(f"sqlite://{target}")  # "sqlite:///abs/path"
    four = open_store(f"sqlite:///{target}")  # an f-string of an absolute Path gives four slashes
    assert isinstance(three, SQLiteStore) and three.path == four.path == target
    job = three.enqueue("alice", {"prompt": "p"})
    assert four.get("alice", job.id) == job
    with sqlite3.connect(target) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for store in (three, four):
        store.close()


def test_a_new_sqlite_store_is_its_users_alone_and_an_existing_one_keeps_its_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # a kernel's usual umask: world-readable unless created otherwise
    try:
        fresh = tmp_path / "new" / "data"
        store = open_store(f"sqlite://{fresh}/store.sqlite3")
        store.enqueue("alice", {"prompt": "a private prompt"})
        modes = {p.name: p.stat().st_mode & 0o777 for p in [fresh, *fresh.iterdir()]}
        assert modes == {"data": 0o700, "store.sqlite3": 0o600, "store.sqlite3-wal": 0o600, "store.sqlite3-shm": 0o600}
        store.close()

        shared = tmp_path / "shared"  # a folder and a store file its owner opened to others on purpose
        shared.mkdir(mode=0o755)
        (shared / "store.sqlite3").touch(mode=0o644)
        store = open_store(f"sqlite://{shared}/store.sqlite3")
        store.enqueue("alice", {"prompt": "a shared prompt"})
        assert (shared.stat().st_mode & 0o777, (shared / "store.sqlite3").stat().st_mode & 0o777) == (0o755, 0o644)
        store.close()
    finally:
        os.umask(old_umask)


def test_sqlite_synchronous_option(tmp_path: Path) -> None:
    full = open_store(f"sqlite://{tmp_path}/s.sqlite3")
    normal = open_store(f"sqlite://{tmp_path}/s.sqlite3?synchronous=normal")
    assert full._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL is the default
    assert normal._conn().execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        open_store(f"sqlite://{tmp_path}/s.sqlite3?synchronous=off")
    full.close()
    normal.close()


def test_settings_store_url_opens(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = open_store(settings.store_url)
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "data" / "store.sqlite3"
    store.close()


def test_redis_url_prefix_is_stripped(redis_url: str) -> None:
    # construction does not connect: an unreachable address answers on the first call
    down = RedisStore("redis://127.0.0.1:1/0")
    assert down.prefix == "mochi"  # the default
    with pytest.raises(StoreUnavailable, match="127.0.0.1:1"):
        down.counts("alice")
    url = redis_url.rsplit("/", 1)[0] + "/3?prefix=team-a&socket_timeout=1.5"
    store = RedisStore(url)
    kwargs = store.client.connection_pool.connection_kwargs  # connects, writes nothing
    assert (store.prefix, store.url) == ("team-a", url)
    assert (kwargs["db"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3, 1.5, 2.0)
    assert "prefix" not in kwargs
    store.close()


def test_open_store_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="sqlite:// or redis://"):
        open_store("postgres://x")


def test_redis_repr_never_shows_the_password() -> None:
    store = RedisStore("redis://admin:s3cr3t-pw@redis.example:6380/2?prefix=team")
    assert repr(store) == "RedisStore('redis://redis.example:6380/2', prefix='team')"
    assert "s3cr3t" not in repr(store) and "admin" not in repr(store)
    assert "s3cr3t" not in repr(RedisStore("rediss://:s3cr3t@h/0")) and "s3cr3t" not in str(RedisStore("redis://:s3cr3t@h"))
    assert repr(RedisStore("redis://127.0.0.1")) == "RedisStore('redis://127.0.0.1:6379/0', prefix='mochi')"
