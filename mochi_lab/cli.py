"""`mochi-lab`: generate a video from the shell, on the embedded default or a real cluster."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from mochi_lab import GenerationParams, MochiCluster, ParamsError

    params = {
        "num_frames": args.frames, "height": args.height, "width": args.width,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "fps": args.fps, "model": args.model, "negative_prompt": args.negative_prompt,
    }
    params = {k: v for k, v in params.items() if v is not None}
    try:  # validate before starting anything
        GenerationParams.parse(args.prompt, **params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cluster = MochiCluster(address=args.address, redis_url=args.redis_url, model=params.get("model", "tiny"))
    job = cluster.generate(args.prompt, force=args.force, **params)
    print(f"job {job.id} queued", file=sys.stderr)
    path = job.result(timeout=args.timeout, progress=True)
    out = shutil.copyfile(path, args.output) if args.output else path
    record = job.refresh()
    print(out)
    print(json.dumps({"job": job.id, "seed": record.params["seed"], "wall_s": round(time.perf_counter() - t0, 2),
                      **{k: round(v, 3) for k, v in record.timings.items()}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mochi-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn a prompt into an MP4")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", help="where to copy the MP4 (default: print the stored path)")
    g.add_argument("--frames", type=int, help="num_frames, 6k+1 (default 19)")
    g.add_argument("--height", type=int, help="multiple of 16 (default 480)")
    g.add_argument("--width", type=int, help="multiple of 16 (default 848)")
    g.add_argument("--steps", type=int, help="num_inference_steps, 1-200 (default 64)")
    g.add_argument("--guidance", type=float, help="guidance_scale (default 4.5)")
    g.add_argument("--seed", type=int, help="default: random, recorded with the job")
    g.add_argument("--fps", type=int, help="default 30")
    g.add_argument("--model", help="tiny (default) or mochi-1-preview")
    g.add_argument("--negative-prompt")
    g.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--redis-url", help="default: REDIS_URL, else SQLite in the data dir")
    g.add_argument("--timeout", type=float, default=None, help="seconds to wait for the video")
    g.add_argument("--force", action="store_true", help="queue anew even if identical params (and seed) ran before")
    g.set_defaults(func=_generate)
    from mochi_lab.spec import add_subcommand  # light: pydantic only; yaml and the cluster load on use

    add_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
