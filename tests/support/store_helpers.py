"""Helpers for the store tests: private redis-server processes and subprocess bodies.

Kept out of the test modules so that spawned processes can import them cheaply.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import free_port


class RedisServer:
    """A private redis-server on 127.0.0.1 (never port 6379), optionally with an fsync-always AOF."""

    def __init__(self, workdir: Path, *, port: int | None = None, appendonly: bool = True) -> None:
        from tests.support.tools import need_tool  # here: the spawned processes' bodies below need no pytest

        self.binary = need_tool("redis-server")  # skipped (failed when strict) naming its install line
        self.port = port or free_port()
        assert self.port != 6379
        self.dir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():  # also fails while the AOF is still loading
                        return self
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def claim_all(url: str, worker_id: str, start: Any, out: Any) -> None:
    """Spawned worker: claim until the queue is empty, completing each job; report (id, token). Every worker
    takes its first job before any takes a second (the barrier, again), so all of them contend for the rest
    however the machine schedules them."""
    from mochi_lab.store import open_store

    store = open_store(url)
    start.wait(60)
    got: list[tuple[str, int]] = []
    while (claim := store.claim(worker_id, lease_s=120)) is not None:
        got.append((claim.job.id, claim.token))
        store.complete(claim.job.id, claim.token, artifacts={}, timings={}, meta={"by": worker_id})
        if len(got) == 1:
            start.wait(60)
    store.close()
    out.put((worker_id, got))


def sqlite_writer(url: str) -> None:
    """Subprocess body: enqueue forever (claiming and finishing some), printing each enqueued id."""
    from mochi_lab.store import open_store

    store = open_store(url)
    i = 0
    while True:
        job = store.enqueue("acct", {"prompt": f"job {i}", "i": i, "pad": "x" * 2000}, tags=[f"t{i % 3}"])
        print(job.id, i, flush=True)
        if i % 2 == 0 and (claim := store.claim(f"w{os.getpid()}", lease_s=60)) is not None:
            store.progress(claim.job.id, claim.token, stage="denoising", step=1, total=2)
            if i % 4 == 0:
                store.complete(claim.job.id, claim.token, artifacts={}, timings={"total_s": 0.1}, meta={})
        i += 1


if __name__ == "__main__":
    if sys.argv[1] == "sqlite_writer":
        sqlite_writer(sys.argv[2])


def enqueue_under_quota(url: str, n: int, limit: int, start, out) -> None:
    """Try `n` enqueues for one account with `max_active=limit`; report (queued ids, refusals)."""
    from mochi_lab.model import QuotaExceeded
    from mochi_lab.store import open_store

    store = open_store(url)
    start.wait()
    ids, refused = [], 0
    for i in range(n):
        try:
            ids.append(store.enqueue("alice", {"prompt": f"q{i}"}, max_active=limit).id)
        except QuotaExceeded:
            refused += 1
    out.put((ids, refused))
    store.close()

