"""One rank of a gang on the tiny Mochi (gloo, CPU), as its own process: runs a list of jobs through
MochiRunner.generate with a `Parallel` plan, as every rank of a gang does.

    python gang_rank.py RANK WORLD PORT CACHE_DIR OUT.pt SPEC.json

SPEC: {"jobs": [{"params": {...GenerationParams}, "layout": [cfg, sp] or null, "stop_at": [rank, step] or null,
                  "lora": [[ADAPTER.safetensors, scale], ...] (optional: loaded once, set for the job, disabled after)}],
       "step_cache_threshold": {"RANK": threshold} (optional; a rank absent has none),
       "decode": {"frames": F, "height": H, "width": W, "seed": S} (optional: decode a random latent instead),
       "timeout_s": 60}
With WORLD 1 there is no process group: the same runner, one process (the reference for memory figures).
Each job's latents, frames, the steps its callback saw, how it ended, its info and the plan's stats go to OUT.pt.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from mochi_lab.params import GenerationParams  # noqa: E402
from mochi_lab.pipelines import JobCancelled, PipelineConfig, load_runner  # noqa: E402
from mochi_lab.pipelines.cfg_parallel import Layout, LayoutError, Parallel, StoppedByPeer, join_pair, rendezvous_store  # noqa: E402


def main() -> None:
    rank, world, port = (int(x) for x in sys.argv[1:4])
    cache_dir, out_path = sys.argv[4], sys.argv[5]
    spec = json.loads(open(sys.argv[6]).read())
    torch.set_num_threads(1)
    threshold = (spec.get("step_cache_threshold") or {}).get(str(rank))
    runner = load_runner("tiny", cache_dir, PipelineConfig(step_cache_threshold=threshold))
    if world > 1:
        timeout = spec.get("timeout_s", 60)
        join_pair(rendezvous_store(rank, port, timeout, world=world), rank, "gloo", timeout, world=world)
        runner.enable_parallel(Parallel(runner.device, timeout_s=timeout))
    if "decode" in spec:
        d = spec["decode"]
        shape = (1, 12, (d["frames"] - 1) // 6 + 1, d["height"] // 8, d["width"] // 8)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(d["seed"]))
        frames, memory = runner.decode(latents, split=world > 1)
        torch.save({"frames": None if frames is None else torch.from_numpy(frames), "memory": memory,
                    "stats": dict(runner.parallel.stats) if world > 1 else {}}, out_path)
        return
    results = []
    for job in spec["jobs"]:
        params = GenerationParams.parse("a cat surfing a wave", **job["params"])
        layout = Layout(*job["layout"]) if job.get("layout") else None
        stop = job.get("stop_at")
        seen: list[int] = []

        def on_step(i: int, total: int) -> None:
            seen.append(i)
            if stop is not None and rank == stop[0] and i == stop[1]:
                raise JobCancelled("cancelled by the test")

        out: dict = {"steps": seen, "outcome": "done"}
        if runner.parallel is not None:
            runner.parallel.reset_stats()
        adapters = []
        for path, scale in job.get("lora") or ():
            data = open(path, "rb").read()
            sha = hashlib.sha256(data).hexdigest()
            runner.lora.load(sha, lambda data=data: data)
            adapters.append((sha, scale))
        try:
            with runner.lora.applied(adapters):
                result = runner.generate(params, on_step, layout=layout)
            out.update(latents=result.latents, frames=torch.from_numpy(result.frames), info=result.info)
        except (JobCancelled, StoppedByPeer) as exc:
            out["outcome"] = f"cancelled: {exc}"
        except LayoutError as exc:
            out["outcome"] = f"refused: {exc}"
        if runner.parallel is not None:
            out["stats"] = dict(runner.parallel.stats)
        results.append(out)
    torch.save(results, out_path)


if __name__ == "__main__":
    main()
