"""Local runtime benchmark: what a runtime that outlives kernels saves. Prints numbers.

    python benchmarks/runtime_bench.py [--repeat 3] [--cache-dir DIR]

(i)  README's quickstart command (`mochi-lab generate "a cat surfing a wave" -o cat.mp4 --height 240
     --width 432 --steps 16 --seed 42`, plus --force so that every run runs the job instead of returning
     the cached one), wall time of the process: without the runtime (MOCHI_LAB_PERSISTENT=0: a Ray of its
     own, today's behaviour), the first run on the runtime (cold: it starts the runtime) and the second run
     (warm: no Ray start, no model load).
(ii) Kernel restart to first frame: a fresh Python process (a restarted kernel) imports mochi_lab, creates
     `MochiCluster()` and submits a 432x240, 19-frame, 16-step job; the clock runs from the process' spawn
     to the job's first denoising step in the store. Cold: MOCHI_LAB_PERSISTENT=0 (each kernel starts Ray
     and loads the model); warm: the runtime is up (the previous kernel was SIGKILLed). Each kernel
     reports its split: imports, MochiCluster(), submit to first step (the job itself).

Everything runs in a temp data dir (the tiny checkpoint is built once in --cache-dir, default a temp dir);
the runtime is stopped at the end. Timings on a shared machine are noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICKSTART = ["generate", "a cat surfing a wave", "--height", "240", "--width", "432", "--steps", "16",
              "--seed", "42", "--force"]
KERNEL = """
import json, sys, time
spawned = float(sys.argv[1])
t0 = time.time()
from mochi_lab import MochiCluster
import ray
t1 = time.time()
c = MochiCluster()
t2 = time.time()
job = c.generate("a kernel restarted", height=240, width=432, num_frames=19, num_inference_steps=16, force=True)
while (job.refresh().step or 0) < 1 and not job.record.finished:
    time.sleep(0.005)
t3 = time.time()
job.result(600)
print(json.dumps({"total_s": t3 - spawned, "start_s": t0 - spawned, "import_s": t1 - t0, "attach_s": t2 - t1,
                  "job_s": t3 - t2, "load_s": round(job.record.timings["load_s"], 2)}), flush=True)
if sys.argv[2] == "kill":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _env(data: Path, cache: Path, persistent: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST",
                                                           "MOCHI_LAB_GATEWAY")}
    env.update(MOCHI_LAB_DATA_DIR=str(data), MOCHI_LAB_CACHE_DIR=str(cache),
               MOCHI_LAB_PERSISTENT="1" if persistent else "0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return env


def quickstart(env: dict[str, str], out: Path) -> str:
    """One run of the command: its process wall time, and the job's own figures from its summary line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mochi_lab.cli", *QUICKSTART, "-o", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    job = json.loads(proc.stdout.splitlines()[-1])
    return (f"{wall:6.2f} s  (job: queue {job['queue_s']:.2f}, load {job['load_s']:.2f}, "
            f"run {job['run_s']:.2f} s)")


def kernel(env: dict[str, str], kill: bool) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", KERNEL, repr(time.time()), "kill" if kill else "exit"],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(lines[-1])


def _summary(rows: list[dict[str, float]]) -> str:
    med = {k: statistics.median(r[k] for r in rows) for k in ("total_s", "start_s", "import_s", "attach_s", "job_s")}
    return (f"{med['total_s']:6.2f} s  (python start {med['start_s']:.2f}, imports {med['import_s']:.2f}, "
            f"MochiCluster() {med['attach_s']:.2f}, submit->first step {med['job_s']:.2f}; load_s "
            f"{[r['load_s'] for r in rows]}); runs {[round(r['total_s'], 2) for r in rows]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="kernel restarts per variant (median reported)")
    ap.add_argument("--cache-dir", type=Path, help="tiny checkpoint cache (default: a temp dir, built once)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    cache = args.cache_dir or tmp / "cache"
    from mochi_lab.pipelines.tiny import ensure_tiny_mochi
    from mochi_lab.pool import runtime

    ensure_tiny_mochi(cache)
    print(f"load average {os.getloadavg()}; {os.cpu_count()} CPUs")
    persistent_data = tmp / "persistent"
    try:
        print("(i) README quickstart (432x240, 19 frames, 16 steps), process wall time:")
        print(f"  own Ray (persistent=False)   {quickstart(_env(tmp / 'own', cache, False), tmp / 'a.mp4')}")
        env = _env(persistent_data, cache, True)
        print(f"  runtime, first run (cold)    {quickstart(env, tmp / 'b.mp4')}")
        print(f"  runtime, second run (warm)   {quickstart(env, tmp / 'c.mp4')}")
        print(f"(ii) kernel restart -> first denoising step, median of {args.repeat}:")
        own = [kernel(_env(tmp / f"own{i}", cache, False), kill=True) for i in range(args.repeat)]
        print(f"  cold (own Ray, model load)  {_summary(own)}")
        kernel(env, kill=True)  # a kernel that dies; the runtime stays
        warm_rows = [kernel(env, kill=True) for _ in range(args.repeat)]
        print(f"  warm (runtime up)           {_summary(warm_rows)}")
        print(f"load average {os.getloadavg()}")
    finally:
        runtime.stop(persistent_data)
        time.sleep(3)  # the persistent=False kernels' reapers end their Ray a moment after the SIGKILL
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
