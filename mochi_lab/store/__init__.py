"""Durable job store: `open_store(url)` gives a Redis or SQLite backend behind one contract."""

from __future__ import annotations

import mochi_lab.model as _model
from mochi_lab._moved import moved_names
from mochi_lab.store.base import Claim, Store

# The statuses, JobRecord and the errors that this face re-exported live in mochi_lab.model; they still
# answer here for one release, with a DeprecationWarning.
__getattr__ = moved_names(__name__)


def open_store(url: str, *, max_attempts: int = 3) -> Store:
    """`sqlite:///abs/path.sqlite3` or `redis://host:port/db[?prefix=name]`."""
    if url.startswith("sqlite://"):
        from mochi_lab.store.sqlite import SQLiteStore

        try:
            return SQLiteStore(url, max_attempts=max_attempts)
        except OSError as exc:  # a data dir under a file, read-only, or gone
            where = exc.filename or url
            raise _model.StoreUnavailable(
                f"cannot create the SQLite store {url}: {where}: {exc.strerror or exc}") from None
    if url.startswith(("redis://", "rediss://", "unix://")):
        from mochi_lab.store.redis import RedisStore

        return RedisStore(url, max_attempts=max_attempts)
    raise ValueError(f"store url must start with sqlite:// or redis://, got {url!r}")


__all__ = ["Claim", "Store", "open_store"]
