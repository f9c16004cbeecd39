"""Memory hygiene of a warm worker: allocated GPU memory (CUDA) or RSS (CPU) across N jobs.

    python benchmarks/worker_memory.py [--jobs 5] [--height 480 --width 848 --frames 19 --steps 8]

Runs a `Worker` in this process (no Ray) on a temporary SQLite store with the tiny model, prints each
job's memory before/after and its peak, and exits 1 if memory after the first job grew by more than
--tolerance-mib. On a GPU the tiny model runs in bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

MiB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=848)
    ap.add_argument("--frames", type=int, default=19)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tolerance-mib", type=float, default=16.0)
    args = ap.parse_args()

    from mochi_lab.config import Settings
    from mochi_lab.params import GenerationParams
    from mochi_lab.store import open_store
    from mochi_lab.worker.loop import Worker

    settings = Settings.from_env(data_dir=tempfile.mkdtemp(prefix="mochi-mem-"), poll_s=0.01)
    store = open_store(settings.store_url)
    size = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps)
    ids = [store.enqueue("bench", GenerationParams.parse("a cat", seed=i, **size).to_dict()).id for i in range(args.jobs)]
    worker = Worker("mem-bench", settings)
    worker.start()
    while store.counts("bench")["done"] + store.counts("bench")["failed"] < args.jobs:
        time.sleep(0.2)
    worker.stop()
    records = sorted((store.get("bench", i) for i in ids), key=lambda r: r.started_at)
    if any(r.status != "done" for r in records):
        print("\n".join(r.error or "" for r in records), file=sys.stderr)
        return 1
    gpu = records[0].meta.get("gpu_allocated_bytes") is not None
    key_after = "gpu_allocated_bytes" if gpu else "rss_after"
    key_before = "gpu_allocated_before" if gpu else "rss_before"
    print(f"worker_memory: {args.jobs} jobs, {args.width}x{args.height}x{args.frames}, {args.steps} steps, "
          f"device {records[0].meta.get('device')} {records[0].meta.get('gpu_name') or ''}")
    print(f"  {'job':>3}  {'before MiB':>10}  {'after MiB':>10}  {'peak MiB':>9}  {'run s':>6}")
    for i, r in enumerate(records):
        peak = r.meta.get("gpu_peak_bytes")
        print(f"  {i:>3}  {r.meta[key_before] / MiB:>10.1f}  {r.meta[key_after] / MiB:>10.1f}  "
              f"{(peak or 0) / MiB:>9.1f}  {r.timings['run_s']:>6.2f}")
    growth = (records[-1].meta[key_after] - records[0].meta[key_after]) / MiB
    ok = growth <= args.tolerance_mib
    print(f"  growth after job 0: {growth:+.1f} MiB ({'flat' if ok else 'GROWS'}, tolerance {args.tolerance_mib} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
