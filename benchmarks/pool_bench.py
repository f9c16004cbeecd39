"""Pool benchmark (tiny model): overhead against a raw pipeline call, makespan against ideal, cold vs warm.

    python benchmarks/pool_bench.py [--workers 2] [--height 128 --width 224 --frames 19 --steps 24]

Starts its own local Ray and a SQLite store in a temporary folder; prints a table.
- overhead ratio: a warm job through MochiCluster (queued -> finished, as the store records it, and as
  the client sees it) over `MochiRunner.generate` in this process with the same params and threads;
- makespan: W workers, 4W jobs queued at once, against the ideal 4W x (one warm job) / W, and against
  the jobs' own run times / W (scheduling alone, without the CPU contention of W jobs at once);
- cold vs warm: the first job of a fresh pool (actor start + model load) against a warm one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=224)
    ap.add_argument("--frames", type=int, default=19)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import torch

    from mochi_lab import GenerationParams, MochiCluster, Settings
    from mochi_lab.pipelines import load_runner

    home = tempfile.mkdtemp(prefix="mochi-pool-bench-")
    settings = Settings.from_env(data_dir=home, namespace="mochi_bench", workers=args.workers, cpus_per_worker=1)
    params = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps)

    def run(cluster, seed: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        job = cluster.generate("a cat surfing a wave", seed=seed, force=True, **params)
        job.result(timeout=1800)
        client_s = time.perf_counter() - t0
        r = job.refresh()
        return r.finished_at - r.created_at, client_s

    cluster = MochiCluster(settings=settings)  # starts the pool: actors spawn and load now
    cold_store, _ = run(cluster, 0)
    cluster.wait_ready()

    # the raw call: this process, same threads as a worker (Ray gives it OMP_NUM_THREADS=num_cpus)
    torch.set_num_threads(settings.cpus_per_worker)
    runner = load_runner("tiny", settings.cache_dir)
    runner.generate(GenerationParams.parse("warm-up", seed=0, **params))

    # Interleaved, so that drift in this shared machine's speed hits both sides alike.
    warm, raw = [], []
    for i in range(args.repeat):
        warm.append(run(cluster, 1 + i))
        p = GenerationParams.parse("a cat surfing a wave", seed=1 + i, **params)
        t0 = time.perf_counter()
        runner.generate(p)
        raw.append(time.perf_counter() - t0)
    warm_store = statistics.median(w[0] for w in warm)
    warm_client = statistics.median(w[1] for w in warm)
    raw_s = statistics.median(raw)
    load_s = [j.timings.get("load_s", 0.0) for j in cluster.jobs(limit=args.repeat)]

    n_jobs = 4 * args.workers
    t0 = time.time()
    jobs = [cluster.generate("a cat surfing a wave", seed=100 + i, force=True, **params) for i in range(n_jobs)]
    records = [j.wait(timeout=3600) for j in jobs]
    makespan = max(r.finished_at for r in records) - t0
    ideal = n_jobs * warm_store / args.workers
    # the same, from the jobs' own run times under concurrency: isolates scheduling from CPU contention
    busy_ideal = sum(r.finished_at - r.started_at for r in records) / args.workers
    cluster.shutdown_pool()

    rows = [
        ("raw pipeline call (in-process), s", f"{raw_s:.3f}"),
        ("warm job via MochiCluster, store latency, s", f"{warm_store:.3f}"),
        ("warm job via MochiCluster, client latency, s", f"{warm_client:.3f}"),
        ("overhead ratio (store latency / raw)", f"{warm_store / raw_s:.3f}"),
        ("overhead ratio (client latency / raw)", f"{warm_client / raw_s:.3f}"),
        (f"makespan, {args.workers} workers x {n_jobs} jobs, s", f"{makespan:.2f}"),
        ("ideal makespan (jobs x warm job / workers), s", f"{ideal:.2f}"),
        ("makespan / ideal", f"{makespan / ideal:.3f}"),
        ("makespan / (sum of job run times / workers)", f"{makespan / busy_ideal:.3f}"),
        ("cold job (fresh pool: actor start + load), s", f"{cold_store:.2f}"),
        ("warm job, s", f"{warm_store:.2f}"),
        ("cold / warm", f"{cold_store / warm_store:.1f}"),
        ("load_s of warm jobs", ", ".join(f"{x:g}" for x in load_s)),
    ]
    size = f"{args.width}x{args.height}, {args.frames} frames, {args.steps} steps, tiny model"
    print(f"pool_bench: {size}; {os.cpu_count()} CPUs; torch threads per worker: {settings.cpus_per_worker}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
