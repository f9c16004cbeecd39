"""What the gang tests share (tests/pool/test_gang.py, test_gang_shapes.py): a pool of one gang on a node of
its own, waiting for it to form, its peers, and the video a job made against one process's.

A gang's pool has its own node (`ranks` logical GPUs), namespace and SQLite store, so the session pool and it
never claim each other's jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import pytest
from PIL import Image

from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import load_runner
from mochi_lab.pool.gang import group_name, peer_name
from mochi_lab.video import write_mp4
from tests.support.faults_helpers import remove_nodes, wait_for

# The budget for a gang to form: new processes that each load the model, the first time or after a loss. It
# is the same budget however it formed; how fast that is belongs to the benchmarks, not here.
FORM_S = 300


@contextlib.contextmanager
def gang_pool(ray_cluster: Any, namespace: str, ranks: int, data_dir: Path) -> Iterator[Any]:
    """A MochiCluster whose pool is one gang of `ranks` ranks (gpus_per_worker=ranks), formed; on exit the
    pool's shutdown must take its peers and placement group with it."""
    import ray

    from mochi_lab import MochiCluster
    from mochi_lab.config import Settings

    node = ray_cluster.add_node(num_cpus=ranks, num_gpus=ranks, object_store_memory=200 * 2**20)
    ray_cluster.wait_for_nodes()
    settings = Settings.from_env(ray_address=ray_cluster.address, namespace=namespace, gpus_per_worker=ranks,
                                 workers=1, lease_s=4.0, worker_ttl_s=6.0, data_dir=data_dir)
    cluster = MochiCluster(settings=settings)
    try:
        cluster.wait_ready(timeout=FORM_S)
        yield cluster
    finally:
        cluster.shutdown_pool()
        cluster.close()
        table = {row["name"]: row for row in ray.util.placement_group_table().values()}
        assert table[group_name(namespace, 0)]["state"] == "REMOVED"
        for rank in range(1, ranks):
            with pytest.raises(ValueError):
                ray.get_actor(peer_name(0, rank), namespace=namespace)
        remove_nodes(ray_cluster, [node])


def formed(cluster: Any, *, replacing: int | None = None) -> dict:
    """Rank 0's row once the gang has formed: loaded (rank 0's load ends with joining its peers), and with
    `replacing`, a rank 0 other than that process (a lost rank's row stays until its TTL)."""

    def ready():
        rows = cluster.workers()
        return rows and rows[0]["state"] in ("idle", "busy") and rows[0]["pid"] != replacing and rows[0]

    return wait_for(ready, FORM_S, "the gang to form" + (f" again without pid {replacing}" if replacing else ""),
                    every=0.2)


def peer(namespace: str, rank: int) -> Any:
    import ray

    return ray.get_actor(peer_name(0, rank), namespace=namespace)


def pings(namespace: str, ranks: int) -> list[dict]:
    """Each peer's (rank 1 and up) answer to a ping: its process, whether it is in a group, its last job."""
    import ray

    return ray.get([peer(namespace, rank).ping.remote() for rank in range(1, ranks)], timeout=30)


def decoded(path: str | Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def assert_single_process_video(job: Any, checkpoint_dir: Path, tmp_path: Path, prompt: str, seed: int,
                                params: dict, *, lora: tuple[Path, float] | None = None) -> None:
    """The job's video is the one a 1-GPU worker makes of it (the float latents of a gang vs one process are
    compared in tests/pipelines: within 1e-5).

    A gang's uint8 frames may differ from one process's by 1 level at a few pixels (the bound of tests/pipelines):
    a CFG half computed as a batch of 1, not 2, rounds differently on some CPUs (the AVX-512 kernels of an AMD
    EPYC: yes; the CPU this was first measured on: no). So the lossless thumbnail (the middle frame) is within 1
    level of one process's, and the MP4 at least 50 dB PSNR from one process's MP4, since x264 spreads a 1-level
    change over its block. Measured (CFG 2 x SP 2, 25 frames at 48x48): 4 pixels of 172,800 off by 1 level, the
    MP4s 68 dB apart; the same job with one step more is 37 dB away, another seed 25 dB. `lora`: one process with
    that adapter."""
    runner = load_runner("tiny", checkpoint_dir)
    adapters = []
    if lora is not None:  # one process with the adapter file `lora[0]` set at scale `lora[1]`
        data = Path(lora[0]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        runner.lora.load(sha, lambda: data)
        adapters.append((sha, lora[1]))
    with runner.lora.applied(adapters):
        single = runner.generate(GenerationParams.parse(prompt, seed=seed, **params))
    reference = decoded(write_mp4(single.frames, tmp_path / "single.mp4", params["fps"]))
    video = decoded(job.artifacts["video"])
    thumbnail = np.asarray(Image.open(job.artifacts["thumbnail"]).convert("RGB")).astype(int)
    middle = single.frames[len(single.frames) // 2].astype(int)
    assert thumbnail.shape == middle.shape and np.abs(thumbnail - middle).max() <= 1
    assert video.shape == reference.shape
    mse = np.mean((video.astype(float) - reference.astype(float)) ** 2)
    psnr = 10 * np.log10(255 ** 2 / mse) if mse else float("inf")
    assert psnr >= 50, f"the MP4 is {psnr:.1f} dB from one process's"
