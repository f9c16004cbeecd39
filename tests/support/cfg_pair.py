"""One rank of a CFG-parallel pair on the tiny Mochi (gloo, CPU), as its own process.

    python cfg_pair.py RANK PORT CACHE_DIR OUT.pt [--steps N] [--cancel-at K] [--preview-fails-at K]

Both ranks run MochiRunner.generate on the same job; rank 0 decodes and previews every step (its preview
raising at step K with --preview-fails-at: an error in rank 0's own work). Each writes its latents, frames,
the steps its callback saw, how it ended and the split's stats to OUT.pt.
"""

from __future__ import annotations

import argparse

import torch

from mochi_lab.params import GenerationParams  # noqa: E402
from mochi_lab.pipelines import JobCancelled, load_runner  # noqa: E402
from mochi_lab.pipelines.cfg_parallel import CfgParallel, StoppedByPeer, join_pair, rendezvous_store  # noqa: E402
from mochi_lab.pipelines.preview import PreviewPlan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rank", type=int)
    ap.add_argument("port", type=int)
    ap.add_argument("cache_dir")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cancel-at", type=int, default=0)
    ap.add_argument("--preview-fails-at", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    runner = load_runner("tiny", a.cache_dir)
    store = rendezvous_store(a.rank, a.port, timeout_s=60)
    join_pair(store, a.rank, "gloo", timeout_s=60)
    runner.enable_cfg_parallel(CfgParallel(runner.device))
    params = GenerationParams.parse("a cat surfing a wave", seed=3, num_frames=7, height=32, width=48,
                                    num_inference_steps=a.steps, guidance_scale=4.5)
    seen: list[int] = []

    def on_step(i: int, total: int) -> None:
        seen.append(i)
        if a.rank == 0 and i == a.cancel_at:
            raise JobCancelled("cancelled by the test")

    def on_preview(i: int, frames) -> None:
        previews.append(i)
        if i == a.preview_fails_at:
            raise OSError("the preview could not be written")

    previews: list[int] = []
    plan = PreviewPlan(on_preview, every=1, min_interval_s=0) if a.rank == 0 else None
    out = {"steps": seen, "previews": previews, "outcome": "done"}
    try:
        result = runner.generate(params, on_step, plan, decode=a.rank == 0)
        out.update(latents=result.latents, frames=torch.from_numpy(result.frames))
    except (JobCancelled, StoppedByPeer) as exc:
        out["outcome"] = f"cancelled: {exc}"
    except OSError as exc:
        out["outcome"] = f"failed: {exc}"
    out["stats"] = dict(runner.parallel.stats)
    torch.save(out, a.out)


if __name__ == "__main__":
    main()
