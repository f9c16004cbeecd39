"""Gateway benchmark: what the multi-user HTTP gateway costs over the direct backend. Prints numbers.

    python benchmarks/gateway_bench.py                       # starts its own pool + gateway on 127.0.0.1
    python benchmarks/gateway_bench.py --url URL --token T   # an existing gateway (loopback only)

(i)   warm tiny job, submit -> `job.result()` (a local MP4 path; the gateway side includes its download),
      through the gateway against the same job through the direct backend on the same pool, interleaved;
      goal: ratio <= 1.05. Needs the direct side: with --url, pass --data-dir/--ray-address of the gateway's
      store and Ray (operator access), or --no-direct to skip.
(ii)  `GET /status/{id}` throughput from 4 client processes (keep-alive, one connection each) for
      --duration seconds; goal >= 1000 requests/s on 2 cores.
(iii) progress fan-out: 50 SSE listeners on `GET /events/{id}` of one job of --fanout-steps steps; per
      listener, the steps never seen; delivery latency = a listener's receipt of step k minus the first
      time anyone saw step k (a store poller every 2 ms when the bench owns the store, else the fastest
      listener: then it is the fan-out spread, a lower bound). Goals: 0 lost, p95 < 200 ms.

Self-started: a local Ray + SQLite store in a temp folder (the direct handle, this process), and the gateway
(`mochi_lab.gateway.app.serve`) as a subprocess on a free loopback port joined to the same Ray and store,
with a static token; everything is torn down at the end. Bounded: every loop has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback, throwaway Ray: no ~/.ray/auth_token

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}
PROMPT = "a cat surfing a wave"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"gateway_bench talks to loopback only, not {host!r}")


# -- (i) warm job latency --------------------------------------------------------
def job_latency(gateway, direct, repeat: int, params: dict) -> list[tuple[str, str]]:
    def run(cluster, seed: int) -> float:
        t0 = time.perf_counter()
        job = cluster.generate(PROMPT, seed=seed, force=True, **params)
        path = job.result(timeout=600)
        assert Path(path).stat().st_size > 0
        return time.perf_counter() - t0

    run(gateway, 10_000)  # warm both paths (connections, caches, the pool's model)
    if direct is not None:
        run(direct, 10_001)
    gw, dr = [], []
    for i in range(repeat):  # interleaved: drift in a shared machine's speed hits both alike
        gw.append(run(gateway, 20_000 + i))
        if direct is not None:
            dr.append(run(direct, 30_000 + i))
    rows = [("(i) warm tiny job via gateway, median s", f"{statistics.median(gw):.3f}  "
             f"(min {min(gw):.3f}, max {max(gw):.3f}, n={repeat})")]
    if dr:
        rows += [("(i) warm tiny job via direct, median s", f"{statistics.median(dr):.3f}  "
                  f"(min {min(dr):.3f}, max {max(dr):.3f}, n={repeat})"),
                 ("(i) gateway / direct (goal <= 1.05)", f"{statistics.median(gw) / statistics.median(dr):.3f}")]
    return rows


# -- (ii) status throughput -------------------------------------------------------
def _status_worker(url: str, token: str, job_id: str, duration: float, start_at: float, out) -> None:
    import httpx

    n = errors = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=10) as c:
        c.get(f"status/{job_id}")  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + duration
        while time.time() < end:
            r = c.get(f"status/{job_id}")
            if r.status_code == 200:
                n += 1
            else:
                errors += 1
    out.put((n, errors))


def status_throughput(url: str, token: str, job_id: str, procs: int, duration: float) -> list[tuple[str, str]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # spawned interpreters import httpx first
    workers = [ctx.Process(target=_status_worker, args=(url, token, job_id, duration, start_at, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=duration + 60) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    ok = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    goal = " (goal >= 1000)" if procs > 1 else f", i.e. {duration / max(ok, 1) * 1000:.2f} ms per request"
    return [(f"(ii) GET /status, {procs} client process{'es' if procs > 1 else ''}, requests/s{goal}",
             f"{ok / duration:.0f}  ({ok} ok, {errors} errors in {duration:g} s)")]


# -- (iii) SSE fan-out ----------------------------------------------------------------
async def _listen(url: str, token: str, job_id: str, seen: dict, attached: list, deadline: float) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"},
                                 timeout=httpx.Timeout(30, read=max(1.0, deadline - time.time()))) as c:
        async with c.stream("GET", f"events/{job_id}") as r:
            r.raise_for_status()
            attached.append(time.time())
            data: list[str] = []
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    rec = json.loads("\n".join(data))
                    data = []
                    seen.setdefault((rec["status"], rec["step"]), time.time())
                    if rec["status"] in ("done", "failed", "cancelled"):
                        return
                if time.time() > deadline:
                    return


def fanout(gateway, url: str, token: str, listeners: int, params: dict, store_poll) -> list[tuple[str, str]]:
    """50 listeners attach while the job is queued (the pool scaled to 0 by an admin token; else behind a
    long blocker job), then the pool comes back and runs it."""
    from mochi_lab.model import DONE

    paused = blocker = None
    try:
        gateway.scale(0)
        paused = True
    except PermissionError:
        blocker = gateway.generate(PROMPT, seed=776, force=True, **dict(params, num_inference_steps=200))
    job = gateway.generate(PROMPT, seed=777, force=True, **params)
    job_id = job.id
    reference: dict = {}
    stop = threading.Event()
    poller = None
    if store_poll is not None:  # the first moment the store holds each (status, step)
        def poll() -> None:
            while not stop.is_set():
                r = store_poll(job_id)
                reference.setdefault((r.status, r.step), time.time())
                if r.finished:
                    return
                time.sleep(0.002)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

    seen = [dict() for _ in range(listeners)]
    attached: list[float] = []
    deadline = time.time() + 600

    async def main() -> None:
        tasks = [asyncio.ensure_future(_listen(url, token, job_id, s, attached, deadline)) for s in seen]
        t0 = time.time()
        while len(attached) < listeners and time.time() - t0 < 120:
            await asyncio.sleep(0.05)
        if paused:
            await asyncio.to_thread(gateway.scale, 1)
        elif blocker is not None:
            await asyncio.to_thread(gateway.backend.cancel, blocker.id)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    stop.set()
    if poller is not None:
        poller.join(timeout=5)
    final = job.refresh()
    total = final.total_steps or params["num_inference_steps"]
    attached_before_start = sum(1 for t in attached if final.started_at is None or t <= final.started_at)
    ref = dict(reference)
    basis = "store poller (2 ms)"
    if not ref:
        basis = "fastest listener (fan-out spread)"
        for s in seen:
            for key, t in s.items():
                ref[key] = min(ref.get(key, t), t)
    steps_in_store = sorted(k for (st, k) in ref if st == "running" and k > 0)
    lost = [sum(1 for k in steps_in_store if ("running", k) not in s) for s in seen]
    # what the server's poller caught (every poll_s) is what any listener got; fan-out loss is against that
    sent = {k for s in seen for (st, k) in s if st == "running" and k > 0}
    fan_lost = [sum(1 for k in sent if ("running", k) not in s) for s in seen]
    lat = [(t - ref[key]) * 1000 for s in seen for key, t in s.items() if key in ref and key[0] == "running"]
    gaps = [ref[("running", b)] - ref[("running", a)] for a, b in zip(steps_in_store, steps_in_store[1:])]
    return [
        ("(iii) SSE: listeners attached before the job started / total", f"{attached_before_start} / {listeners}"),
        ("(iii) job", f"{params['width']}x{params['height']}, {params['num_frames']} frames: {final.status}, "
                      f"{total} steps, median step {statistics.median(gaps) * 1000:.0f} ms"
         if gaps else final.status),
        (f"(iii) steps seen in the store (basis: {basis})", f"{len(steps_in_store)} of {total}"),
        ("(iii) steps the server sent (any listener got)", f"{len(sent)}  (steps shorter than the "
         "server's events poll merge into the next)"),
        ("(iii) fan-out loss: steps sent but missed, per listener (goal 0)", f"max {max(fan_lost)}, sum {sum(fan_lost)}"),
        ("(iii) steps in the store missed, per listener", f"max {max(lost)}, sum {sum(lost)}"),
        ("(iii) delivery latency p50 / p95 / max, ms (goal p95 < 200)",
         f"{_pct(lat, 50):.1f} / {_pct(lat, 95):.1f} / {max(lat) if lat else float('nan'):.1f}  (n={len(lat)})"),
        ("(iii) job finished as done", str(final.status == DONE)),
    ]


# -- a self-started gateway ---------------------------------------------------------
def _start_gateway(home: Path, ray_address: str, token: str, account: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, RAY_ADDRESS=ray_address, MOCHI_LAB_DATA_DIR=str(home / "data"),
               MOCHI_LAB_NAMESPACE="mochi_gateway_bench",
               MOCHI_LAB_GATEWAY_TOKENS=json.dumps({hashlib.sha256(token.encode()).hexdigest():
                                                    {"account": account, "admin": True}}))
    for var in [v for v in env if v.startswith("JUPYTERHUB_")]:  # static tokens only: no hub
        env.pop(var)
    env["MOCHI_LAB_WORKERS"] = "1"  # the server's settings as deployed otherwise (events poll, logging)
    log = open(home / "gateway.log", "wb")
    code = f"from mochi_lab.gateway.app import serve; serve('127.0.0.1', {port})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited ({proc.returncode}); see {home / 'gateway.log'}:\n"
                             + (home / "gateway.log").read_text()[-3000:])
        try:
            if httpx.get(url + "healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the gateway did not answer /healthz in 120 s; see {home / 'gateway.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an existing gateway (loopback); default: start one")
    ap.add_argument("--token", help="its token (default: $JUPYTERHUB_API_TOKEN)")
    ap.add_argument("--data-dir", help="with --url: the gateway's MOCHI_LAB_DATA_DIR, for the direct side")
    ap.add_argument("--ray-address", help="with --url: the gateway's Ray, for the direct side")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct side of (i)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--listeners", type=int, default=50)
    ap.add_argument("--fanout-steps", type=int, default=24)
    ap.add_argument("--fanout-size", type=int, default=128, help="the fan-out job's width and height")
    ap.add_argument("--small", default="224x128x19x24", help="(i) also at WxHxFRAMESxSTEPS ('' to skip)")
    ap.add_argument("--only", default="i,ii,iii", help="which parts, e.g. ii,iii")
    args = ap.parse_args()
    parts = set(args.only.split(","))

    from mochi_lab import MochiCluster, Settings

    proc = None
    direct = None
    home = Path(tempfile.mkdtemp(prefix="mochi-gateway-bench-"))
    token = args.token or os.environ.get("JUPYTERHUB_API_TOKEN") or ""
    rows: list[tuple[str, str]] = []
    try:
        if args.url:
            _loopback(args.url)
            url = args.url
            if not args.no_direct and (args.data_dir or args.ray_address):
                settings = Settings.from_env(data_dir=args.data_dir, ray_address=args.ray_address)
                direct = MochiCluster(settings=settings, start_pool=False)
        else:
            token = token or "bench-" + os.urandom(16).hex()
            settings = Settings.from_env(data_dir=home / "data", namespace="mochi_gateway_bench", account="bench",
                                         workers=1)
            direct = MochiCluster(settings=settings)  # this process: local Ray, the pool, SQLite
            direct.wait_ready(600)
            proc, url = _start_gateway(home, direct.backend.ray_address, token, "bench")
        if not token:
            raise SystemExit("pass --token or set JUPYTERHUB_API_TOKEN")
        from mochi_lab.client.http import GatewayBackend

        # downloads go to the bench's temp folder, not the user's cache
        gateway = MochiCluster(backend=GatewayBackend(url, token, cache_dir=home / "client-cache"))
        if direct is not None and direct.account != gateway.account:
            print(f"note: direct account {direct.account!r} != gateway account {gateway.account!r}; the pool is shared")
        if args.no_direct:
            direct = None

        if "i" in parts:
            rows += job_latency(gateway, direct, args.repeat, TINY)
            if args.small:
                w, h, f, st = (int(x) for x in args.small.split("x"))
                small = dict(TINY, width=w, height=h, num_frames=f, num_inference_steps=st)
                rows += [(k.replace("tiny job", f"job {args.small}"), v)
                         for k, v in job_latency(gateway, direct, max(3, args.repeat // 2), small)]
        if "ii" in parts:
            job = gateway.generate(PROMPT, seed=1, **TINY)
            job.wait(600)
            rows += status_throughput(url, token, job.id, 1, args.duration)
            rows += status_throughput(url, token, job.id, args.procs, args.duration)
        if "iii" in parts:
            store_poll = None
            if direct is not None and direct.account == gateway.account:
                store_poll = direct.backend.get
            fan = dict(TINY, height=args.fanout_size, width=args.fanout_size, num_frames=13,
                       num_inference_steps=args.fanout_steps)
            rows += fanout(gateway, url, token, args.listeners, fan, store_poll)
        gateway.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if direct is not None and not args.url:
            direct.shutdown_pool()
            direct.close()

    print(f"gateway_bench: {os.cpu_count()} CPUs; gateway {url if args.url else 'self-started on 127.0.0.1'}; "
          f"tiny model, {TINY['width']}x{TINY['height']}, {TINY['num_frames']} frames, {TINY['num_inference_steps']} steps")
    width = max(len(k) for k, _ in rows) if rows else 0
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
