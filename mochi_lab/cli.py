"""`mochi-lab`: generate videos and run experiment specs from the shell, on the embedded default or a cluster.

    mochi-lab generate "a cat surfing a wave" -o cat.mp4 --steps 16
    mochi-lab experiment run experiments/steps_vs_quality.yaml --wait
    mochi-lab gateway --host 0.0.0.0 --port 8770
    mochi-lab up | status | down       # the local runtime that outlives kernels (no RAY_ADDRESS)

Experiment specs are YAML: the experiment's name and grid; fixed params apply to every run, grid params
are swept (see experiments/README.md):

    name: steps-vs-quality
    prompts: ["a cat surfing a wave"]
    seeds: [1, 2]
    params: {num_frames: 7, height: 32, width: 32, fps: 8}
    grid: {num_inference_steps: [2, 4, 8]}

Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad input, 124 timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mochi_lab.params import validate_name

EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 1, 2, 124


class SpecError(ValueError):
    """The YAML spec is malformed; the message names the file and the field."""


class ExperimentSpec(BaseModel):
    """One experiment: its identity, prompts, seeds, fixed params and swept grid."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    model: str = "tiny"
    prompts: list[str] = Field(min_length=1)
    seeds: list[int] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @model_validator(mode="after")
    def _disjoint(self) -> "ExperimentSpec":
        both = set(self.params) & set(self.grid)
        if both:
            raise ValueError(f"{', '.join(sorted(both))} appear in both params and grid; keep each in one")
        if any(not values for values in self.grid.values()):
            raise ValueError("every grid entry needs at least one value")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentSpec":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
            return cls.model_validate(data if isinstance(data, dict) else {})
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"{path}: {exc}") from None
        except ValidationError as exc:
            lines = [f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors()]
            raise SpecError(f"{path}: invalid experiment spec:\n  " + "\n  ".join(lines)) from None

    @property
    def group_by(self) -> list[str]:
        """The columns the summary groups by: the grid's params, else the prompt."""
        return list(self.grid) or ["prompt"]


def summarize(df, group_by: list[str]):
    """Runs, done and mean timings per value of `group_by` (e.g. seconds per steps value)."""
    done = df[df["status"] == "done"]
    table = df.groupby(group_by, dropna=False).agg(runs=("run_key", "size"))
    table["done"] = done.groupby(group_by).size().reindex(table.index, fill_value=0)
    for col in ("denoise_s", "decode_s", "run_s"):
        table[f"mean_{col}"] = done.groupby(group_by)[col].mean().reindex(table.index).round(3)
    return table


def _fail(message: str, code: int) -> int:
    print(f"mochi-lab: {message}", file=sys.stderr)
    return code


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(text)


def _cluster(args: argparse.Namespace, model: str):
    from mochi_lab.client.cluster import MochiCluster

    return MochiCluster(address=args.address, redis_url=args.redis_url, model=model)


def _generate(args: argparse.Namespace) -> int:
    from mochi_lab.client.job import JobCancelledError, JobFailed
    from mochi_lab.params import GenerationParams, ParamsError

    params = {
        "num_frames": args.frames, "height": args.height, "width": args.width,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "fps": args.fps, "model": args.model, "negative_prompt": args.negative_prompt,
    }
    try:  # validate (once) before anything starts
        p = GenerationParams.parse(args.prompt, **{k: v for k, v in params.items() if v is not None})
    except ParamsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    output = Path(args.output) if args.output else None
    if output is not None:  # a bad path found now costs nothing; after the job it costs the job
        folder = output if output.is_dir() else output.parent
        if not folder.is_dir():
            return _fail(f"-o {output}: folder {folder} does not exist", EXIT_USAGE)
        if not os.access(folder, os.W_OK):
            return _fail(f"-o {output}: folder {folder} is not writable", EXIT_USAGE)
    t0 = time.perf_counter()
    cluster = _cluster(args, p.model)
    job = cluster.generate(p, force=args.force)
    print(f"job {job.id} queued", file=sys.stderr)
    try:
        path = job.result(args.timeout, progress=True)
        if output is not None:
            path = job.save(output)
    except TimeoutError:
        return _fail(f"job {job.id}: still {job.record.status} ({job.record.stage}) after {args.timeout:g} s; "
                     f"it keeps running: `cluster.job({job.id!r})` re-attaches", EXIT_TIMEOUT)
    except JobFailed as exc:
        return _fail(f"job {job.id}: failed: {_last_line(exc.error)}", EXIT_FAILED)
    except JobCancelledError:
        return _fail(f"job {job.id}: cancelled", EXIT_FAILED)
    record = job.record
    print(path)
    print(json.dumps({"job": job.id, "seed": record.params["seed"], "wall_s": round(time.perf_counter() - t0, 2),
                      **{k: round(v, 3) for k, v in record.timings.items()}}))
    return 0


def _run_spec(args: argparse.Namespace) -> int:
    """Queue the spec's sweep, optionally wait and print timings per grid value."""
    from mochi_lab.extras import require
    from mochi_lab.params import ParamsError

    if args.wait:  # before anything is queued, not after the runs
        require("mochi-lab experiment --wait (its table of runs)", "notebook", "pandas",
                hint=" (or pip install pandas)")
    try:
        spec = ExperimentSpec.load(args.spec)
    except SpecError as exc:
        return _fail(str(exc), EXIT_USAGE)
    cluster = _cluster(args, spec.model)
    exp = cluster.experiment(spec.name, description=spec.description, tags=spec.tags)
    try:
        jobs = exp.sweep(spec.prompts, spec.seeds, **spec.params, **spec.grid)
    except ParamsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    requeued = exp.resume() if args.resume else []
    print(f"experiment {exp.name}: {len(jobs)} runs ({len(requeued)} re-queued); status {exp.status()}",
          file=sys.stderr)
    if not args.wait:
        return 0
    try:
        counts = exp.wait(timeout=args.timeout)
    except TimeoutError as exc:
        return _fail(str(exc), EXIT_TIMEOUT)
    df = exp.to_dataframe(all_columns=True)
    print(summarize(df, spec.group_by).to_string())
    if args.export:
        print(f"exported to {exp.export(args.export)}", file=sys.stderr)
    return 0 if counts["done"] == len(df) else EXIT_FAILED


def _gateway(args: argparse.Namespace) -> int:
    """Serve the multi-user gateway (the only door to the store and the pool on a shared cluster)."""
    from mochi_lab.config import Settings
    from mochi_lab.extras import require

    require("mochi-lab gateway", "gateway", "fastapi", "uvicorn", "ray")
    from mochi_lab.gateway.app import serve

    serve(args.host, args.port, Settings.from_env(ray_address=args.address, redis_url=args.redis_url))
    return 0


def _local_settings(**overrides: Any):
    from mochi_lab.config import Settings
    from mochi_lab.extras import require

    require("the local runtime (mochi-lab up, status, down)", "cpu", "ray", "psutil")
    settings = Settings.from_env(**overrides)
    if settings.ray_address:
        raise ValueError(f"RAY_ADDRESS is set ({settings.ray_address}): up, status and down manage the local "
                         "runtime only; unset it")
    return settings


def _up(args: argparse.Namespace) -> int:
    """Start the local runtime (or attach to the running one) and wait until its workers have loaded."""
    from mochi_lab.client.cluster import MochiCluster

    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}", EXIT_USAGE)
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        return _fail(f"--idle-timeout must be a positive number of seconds, got {args.idle_timeout:g}", EXIT_USAGE)
    settings = _local_settings(workers=args.workers, runtime_idle_s=args.idle_timeout, persistent=True)
    with MochiCluster(model=args.model, settings=settings) as cluster:
        cluster.wait_ready(args.timeout)
    from mochi_lab.pool import runtime

    record = runtime.read_record(settings.data_dir)
    if record is not None and record["model"] != args.model:  # it was up already, for another model
        print(f"the local runtime keeps {record['model']} warm; {args.model} loads with its first job",
              file=sys.stderr)
    return _status(args)


def _status(args: argparse.Namespace) -> int:
    """Print the local runtime: address, pid, model, workers, idle time, memory. Exit 1 when none runs."""
    from mochi_lab.config import redact_url
    from mochi_lab.model import StoreError
    from mochi_lab.store import open_store

    settings = _local_settings()  # first: it names the extra the runtime needs
    from mochi_lab.pool import runtime

    info = runtime.status(settings.data_dir)
    if info is None:
        print("null" if args.json else f"no local runtime running (data dir {settings.data_dir})")
        return EXIT_FAILED
    workers = []
    down_since = info.get("store_down_since")
    if info["store"] == redact_url(settings.store_url) and down_since is None:  # the store its workers report to
        try:
            store = open_store(settings.store_url)
            try:
                # the runtime's own workers, whichever model each has loaded; not another pool's on this store
                own = {p.pid for p in runtime.processes(info)}
                workers = [w for w in store.workers() if w.get("pid") in own]
            finally:
                store.close()
        except StoreError as exc:  # gone since the runtime last looked: its next tick records it
            print(f"(cannot read the workers: {exc})", file=sys.stderr)
    info["worker_rows"] = [{k: w.get(k) for k in ("worker_id", "state", "current_job", "jobs_done", "rss_bytes")}
                           for w in workers]
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    idle = "not idle" if info["idle_s"] is None else f"idle {info['idle_s']:.0f} s"
    print(f"local runtime at {info['address']} (pid {info['pid']}), up {time.time() - info['started_at']:.0f} s")
    print(f"  model {info['model']}, {info['workers']} worker(s): " + (", ".join(
        f"{w['worker_id']} {w['state']} ({w['jobs_done']} done)" for w in info["worker_rows"]) or "none reporting"))
    print(f"  {idle} (stops after {info['idle_timeout_s']:g} s idle); {info['drivers']} handle(s) attached, "
          f"{info['busy_workers']} worker(s) busy")
    print(f"  memory {info['rss_bytes'] / 2**30:.2f} GiB RSS in {info['processes']} processes")
    bound = f"stops after {info['store_gone_s']:g} s unreachable with no handle attached"
    if down_since is None:
        print(f"  store {info['store']} ({bound})")
    else:
        print(f"  store unreachable since {time.strftime('%H:%M:%S', time.localtime(down_since))}: "
              f"{info['store']} ({bound})")
    print(f"  log {info['log']}")
    return 0


def _down(args: argparse.Namespace) -> int:
    """Stop the local runtime: its pool, Ray and record (queued jobs stay queued in the store)."""
    settings = _local_settings()  # first: it names the extra the runtime needs
    from mochi_lab.pool import runtime

    record = runtime.stop(settings.data_dir)
    if record is None:
        print(f"no local runtime running (data dir {settings.data_dir})")
    else:
        print(f"stopped the local runtime at {record['address']} (pid {record['pid']})")
    return 0


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--redis-url", help="default: REDIS_URL, else SQLite in the data dir")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mochi-lab", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn a prompt into an MP4")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", help="where to copy the MP4 (default: print the stored path)")
    g.add_argument("--frames", type=int, help="num_frames, 6k+1 (default 19)")
    g.add_argument("--height", type=int, help="multiple of 16 (default 480)")
    g.add_argument("--width", type=int, help="multiple of 16 (default 848)")
    g.add_argument("--steps", type=int, help="num_inference_steps, 2-200 (default 64)")
    g.add_argument("--guidance", type=float, help="guidance_scale (default 4.5)")
    g.add_argument("--seed", type=int, help="default: random, recorded with the job")
    g.add_argument("--fps", type=int, help="default 30")
    g.add_argument("--model", help="tiny (default) or mochi-1-preview")
    g.add_argument("--negative-prompt")
    g.add_argument("--timeout", type=float, default=None, help="seconds to wait for the video (exit 124 after)")
    g.add_argument("--force", action="store_true", help="queue anew even if identical params (and seed) ran before")
    _connection_args(g)
    g.set_defaults(func=_generate)
    e = sub.add_parser("experiment", help="run experiments from YAML specs")
    esub = e.add_subparsers(dest="experiment_command", required=True)
    r = esub.add_parser("run", help="queue a spec's sweep (idempotent: re-running queues nothing new)")
    r.add_argument("spec", help="path of the YAML spec, e.g. experiments/prompt_sweep.yaml")
    r.add_argument("--wait", action="store_true", help="wait for every run and print timings per grid value")
    r.add_argument("--resume", action="store_true", help="also re-queue failed and cancelled runs")
    r.add_argument("--timeout", type=float, default=None, help="seconds to wait (with --wait)")
    r.add_argument("--export", metavar="DIR", help="copy the videos and manifests here (with --wait)")
    _connection_args(r)
    r.set_defaults(func=_run_spec)
    gw = sub.add_parser("gateway", help="serve the JupyterHub-authenticated gateway (see docs/how-to/jupyterhub.md)")
    gw.add_argument("--host", default=None, help="default: MOCHI_LAB_GATEWAY_HOST, else 127.0.0.1")
    gw.add_argument("--port", type=int, default=None, help="default: MOCHI_LAB_GATEWAY_PORT, else 8770")
    _connection_args(gw)
    gw.set_defaults(func=_gateway)
    up = sub.add_parser("up", help="start the local runtime (Ray on 127.0.0.1 + warm pool) that outlives kernels")
    up.add_argument("--model", default="tiny", help="the model its pool keeps warm (default tiny); "
                    "with a runtime up already, it loads with its first job")
    up.add_argument("--workers", type=int, help="pool size (default: one per GPU, or one on a CPU-only machine)")
    up.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds (default: "
                    "MOCHI_LAB_RUNTIME_IDLE_S, else 1800); applies when this command starts it")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    up.set_defaults(func=_up)
    st = sub.add_parser("status", help="show the local runtime (exit 1 when none runs)")
    st.set_defaults(func=_status)
    dn = sub.add_parser("down", help="stop the local runtime")
    dn.set_defaults(func=_down)
    for cmd in (up, st, dn):
        if cmd is not dn:
            cmd.add_argument("--json", action="store_true", help="print the status as JSON")
        cmd.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted (queued jobs keep running)", 130)
    except Exception as exc:  # one clear line; --debug shows the traceback
        return _fail(f"{type(exc).__name__}: {_last_line(str(exc))}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
