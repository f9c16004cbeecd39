"""`Store.put_experiment(max_count=)` on SQLite and Redis: a new experiment past the account's count is refused,
checked and written in one step, so that stores opened side by side (gateway replicas) cannot both pass it."""

from __future__ import annotations

import threading

import pytest

from mochi_lab.model import QuotaExceeded


def _record(name: str) -> dict:
    return {"name": name, "account": "alice", "runs": []}


def test_a_new_experiment_past_the_count_is_refused_and_an_existing_one_is_replaced(store):
    for i in range(3):
        store.put_experiment("alice", _record(f"e{i}"), max_count=3)
    with pytest.raises(QuotaExceeded, match="alice has 3 experiments; the limit is max_experiments=3"):
        store.put_experiment("alice", _record("e3"), max_count=3)
    with pytest.raises(KeyError):
        store.get_experiment("alice", "e3")
    store.put_experiment("alice", {**_record("e0"), "description": "again"}, max_count=3)
    assert store.get_experiment("alice", "e0")["description"] == "again"
    store.put_experiment("bob", _record("e3"), max_count=3)  # each account counts its own
    store.put_experiment("alice", _record("e3"))  # no limit given: none applies
    assert len(store.list_experiments("alice")) == 4


def test_stores_side_by_side_never_pass_the_count_together(make_store):
    stores = [make_store() for _ in range(4)]
    start, won = threading.Barrier(len(stores)), []

    def create(store, i):
        start.wait()
        for k in range(5):
            try:
                store.put_experiment("alice", _record(f"s{i}-{k}"), max_count=6)
                won.append((i, k))
            except QuotaExceeded:
                pass

    threads = [threading.Thread(target=create, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 6 and len(stores[0].list_experiments("alice")) == 6
