"""The result cache: identical (model, params, seed) gives the existing job instead of a new one.

Like dask's `pure=True`, the key is a content hash of the canonical params JSON. It is built on the
store's idempotency keys, so the lookup and the enqueue are one atomic store call on both backends:
two kernels asking for the same video at once get the same job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from mochi_lab.model import CANCELLED, FAILED, JobRecord
from mochi_lab.store import Store

CACHE_PREFIX = "cache/"
_DEAD = frozenset({FAILED, CANCELLED})


def canonical_json(data: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace: equal dicts give equal text (and so equal hashes)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def params_key(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical params JSON (model and resolved seed are params fields)."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()


def cache_key(params: Mapping[str, Any], experiment: str | None = None) -> str:
    # A job linked to an experiment answers only for that experiment, so history filters stay true.
    data = dict(params) if experiment is None else {"params": dict(params), "experiment": experiment}
    return params_key(data)


def cached_enqueue(
    store: Store,
    account: str,
    params: Mapping[str, Any],
    *,
    priority: int = 0,
    experiment: str | None = None,
    tags: Iterable[str] = (),
    max_active: int | None = None,
) -> JobRecord:
    """Return the account's done or in-flight job with these exact params, else queue a new one.

    Slot n of a key holds one job; a failed or cancelled job keeps its slot (history stays intact),
    so the walk moves on to slot n+1. The walk is as long as the number of dead attempts, usually 0.
    """
    key = cache_key(params, experiment)
    tags = list(tags)
    for slot in itertools.count():
        record = store.enqueue(
            account, dict(params), priority=priority, experiment=experiment, tags=tags,
            idempotency_key=f"{CACHE_PREFIX}{key}/{slot}", max_active=max_active,
        )
        if record.status not in _DEAD:
            return record
    raise AssertionError("unreachable")  # itertools.count never ends


__all__ = ["cache_key", "cached_enqueue", "canonical_json", "params_key"]
