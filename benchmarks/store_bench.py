"""Job store throughput: enqueue + claim + complete cycles per second, per backend.

    python benchmarks/store_bench.py [--cycles 5000] [--procs 4] [--redis redis://127.0.0.1:6379/0]

SQLite runs on a temporary file; Redis under a throwaway key prefix that is deleted afterwards.
Each cycle is three store calls (three round trips on Redis: one Lua script each).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mochi_lab.store import Store, open_store
from mochi_lab.store.redis import RedisStore

PARAMS = {"prompt": "a fox in the snow, cinematic", "num_frames": 19, "height": 480, "width": 848,
          "num_inference_steps": 64, "guidance_scale": 4.5, "seed": 42}


def cycles(store: Store, n: int, worker: str) -> None:
    """n full job lifecycles; each process enqueues into its own account and claims whatever is next."""
    for _ in range(n):
        store.enqueue(worker, PARAMS)
        claim = store.claim(worker, lease_s=60)
        assert claim is not None
        store.complete(claim.job.id, claim.token, artifacts={"video": "/tmp/x.mp4"}, timings={"total_s": 1.0}, meta={})


def _child(url: str, n: int, worker: str, barrier, out) -> None:
    store = open_store(url)
    cycles(store, 20, worker)  # warm up: connections, script cache
    barrier.wait()
    began = time.perf_counter()
    cycles(store, n, worker)
    out.put(time.perf_counter() - began)
    store.close()


def run(url: str, n: int, procs: int) -> float:
    if procs == 1:
        store = open_store(url)
        cycles(store, 20, "w0")
        began = time.perf_counter()
        cycles(store, n, "w0")
        elapsed = time.perf_counter() - began
        store.close()
        return n / elapsed
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_child, args=(url, n, f"w{i}", barrier, out)) for i in range(procs)]
    for w in workers:
        w.start()
    slowest = max(out.get(timeout=600) for _ in workers)
    for w in workers:
        w.join()
    return procs * n / slowest


def round_trip_ceiling(url: str, n: int) -> float:
    """Cycles/s if a cycle were nothing but three bare EVALSHA round trips: the machine's ceiling."""
    store = RedisStore(url)
    script = store.client.register_script("return 1")
    script()
    began = time.perf_counter()
    for _ in range(3 * n):
        script()
    elapsed = time.perf_counter() - began
    store.close()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=5000, help="cycles per process")
    ap.add_argument("--procs", type=int, default=4, help="also run with this many processes (1: skip)")
    ap.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()

    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"sqlite": f"sqlite:///{tmp}/bench.sqlite3",
                    "redis": f"{args.redis.split('?')[0]}?prefix=mochi-bench-{uuid.uuid4().hex[:8]}"}
        for name, url in backends.items():
            try:
                for procs in sorted({1, max(1, args.procs)}):
                    rows.append((name, procs, run(url, args.cycles if procs == 1 else args.cycles // procs, procs)))
                if name == "redis":
                    rows.append(("(3 RTT)", 1, round_trip_ceiling(url, args.cycles)))
            finally:
                if name == "redis":
                    RedisStore(url).drop_all()
    print(f"{'backend':<8} {'procs':>5} {'cycles/s':>10}")
    for name, procs, rate in rows:
        print(f"{name:<8} {procs:>5} {rate:>10,.0f}")
    print("(3 RTT): three bare `return 1` scripts per cycle, the round-trip ceiling of this machine right now")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
