"""The autoscaling sequence on Ray's real autoscaler, in a process of its own (a process joins one Ray).

Ray's fake multi-node provider (`ray.autoscaler._private.fake_multi_node`, what
`ray.cluster_utils.AutoscalingCluster` drives) runs the real autoscaler in the head and starts node
processes on this machine. `AutoscalingCluster.start()` itself runs `ray stop --force`, which would end
every Ray on the machine, and its GCS port is Redis' 6379; so the head is started here the same way, on
a free port, in a temp dir of its own, and only that session's processes are ended afterwards.

    python tests/support/autoscale_scenario.py OUT_DIR   # prints one JSON line: the timeline and its figures

The sequence: 6 queued jobs with max_workers=3 bring up 3 GPU nodes and 3 workers; the jobs run; the
idle workers retire after the idle timeout and their nodes are removed; one more job brings a node and a
worker back from zero, the job showing "waiting for a worker" meanwhile. The 6 jobs are held at a gate
(MOCHI_LAB_TEST_GATES, inherited by the head and its nodes) until the third worker is up, so the first
workers cannot drain the queue before the others come.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "disabled"

import psutil  # noqa: E402

from tests.support.ports import free_port  # noqa: E402  (the repository is on PYTHONPATH)

REPO = Path(__file__).resolve().parents[2]
MAX_WORKERS = 3
JOB = {"num_frames": 13, "height": 64, "width": 64, "num_inference_steps": 12, "fps": 8}
HELD = "autoscale, held until three workers are up"
NODE_IDLE_MINUTES = 0.1  # the autoscaler removes a node idle this long (6 s)


def autoscaling_config(gcs: str) -> dict:
    """What AutoscalingCluster generates from the fake provider's example, with our node type: one
    logical GPU and one CPU per node, up to MAX_WORKERS nodes, none at rest."""
    return {
        "cluster_name": "mochi-autoscale", "max_workers": MAX_WORKERS,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                         "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default", "upscaling_speed": 3.0, "idle_timeout_minutes": NODE_IDLE_MINUTES,
        "docker": {}, "auth": {"ssh_user": "ubuntu"}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_head(tmp: Path) -> str:
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # notice a removed node in ~2 s; wait for the node agents as long as a loaded 2-core machine needs
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 0,
              "agent_register_timeout_ms": 120_000}
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}",
                    f"--autoscaling-config={config}", f"--system-config={json.dumps(system, separators=(',', ':'))}"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return gcs


def end_session(tmp: Path) -> int:
    """End every process of this Ray (head, autoscaler, fake nodes, workers), by pid: SIGTERM, then SIGKILL."""
    from mochi_lab.pool.reaper import session_processes

    procs = session_processes(str(tmp / "ray"), {})
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


class Timeline:
    """Once a second: queued and running jobs, worker actors, ready workers, alive GPU nodes."""

    def __init__(self, backend, t0: float):
        self.backend, self.t0, self.rows = backend, t0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict:
        import ray

        counts = self.backend.store.counts("alice")
        workers = self.backend.store.workers()
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
        snap = self.backend.controller.snapshot
        return {"t": round(time.monotonic() - self.t0, 2), "queued": counts["queued"], "running": counts["running"],
                "actors": len(self.backend.pool.handles()), "desired": snap.get("desired"),
                "ready": sum(1 for w in workers if w.get("state") in ("idle", "busy")), "nodes": len(nodes)}

    def _run(self) -> None:
        while not self._stop.wait(1.0 - (time.monotonic() - self.t0) % 1.0):
            try:
                self.rows.append(self.sample())
            except Exception as exc:  # a sample lost to a busy machine is a gap in the plot, not a failure
                print(f"sample failed: {exc!r}", file=sys.stderr)

    def start(self) -> "Timeline":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, after: float, test) -> float | None:
        return next((r["t"] for r in self.rows if r["t"] >= after and test(r)), None)


def wait(what: str, test, timeout: float, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = test()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def plot(rows: list[dict], marks: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    ax.step(t, [r["queued"] + r["running"] for r in rows], where="post", label="jobs queued + running", lw=2)
    ax.step(t, [r["actors"] for r in rows], where="post", label="worker actors (incl. pending)", ls="--")
    ax.step(t, [r["ready"] for r in rows], where="post", label="workers ready", lw=2)
    ax.step(t, [r["nodes"] for r in rows], where="post", label="GPU nodes", ls=":", lw=2)
    for name, x in marks.items():
        ax.axvline(x, color="grey", lw=0.8)
        ax.annotate(name, (x, 0.1), rotation=90, va="bottom", ha="right", fontsize=8)
    ax.set_xlabel("seconds since the first job was queued")
    ax.set_ylabel("count")
    ax.set_title(f"mochi_lab pool controller on Ray's autoscaler (fake multi-node), max_workers={MAX_WORKERS}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(out: Path) -> dict:
    from mochi_lab.client.direct import WAITING_STAGE, DirectBackend
    from mochi_lab.config import ScalingConfig, Settings
    from mochi_lab.params import GenerationParams, SubmitOptions
    from tests.support.gate import Gate

    tmp = Path(tempfile.mkdtemp(prefix="mochi-as-", dir="/tmp"))  # short: Ray's socket paths have a limit
    backend = gate = None
    if not os.environ.get("MOCHI_LAB_TEST_GATES"):  # run by hand: gates of its own, set before Ray starts
        os.environ["MOCHI_LAB_TEST_GATES"] = str(tmp / "gates")
        (tmp / "gates").mkdir()
    try:
        gcs = start_head(tmp)
        settings = Settings.from_env(ray_address=gcs, data_dir=tmp / "data", namespace="mochi_autoscale",
                                     account="alice", gpu_workers=True, cpus_per_worker=1, lease_s=10.0,
                                     worker_ttl_s=6.0)
        scaling = ScalingConfig(min_workers=0, max_workers=MAX_WORKERS, target_per_worker=1, idle_timeout_s=4.0,
                                cooldown_s=2.0, interval_s=0.5)
        backend = DirectBackend.start(settings, "tiny", scaling=scaling)
        t0 = time.monotonic()
        timeline = Timeline(backend, t0).start()
        gate = Gate(HELD, "denoising", 1)
        jobs = [backend.submit(GenerationParams.parse(prompt=HELD, seed=i, **JOB), SubmitOptions())
                for i in range(6)]
        waiting = backend.get(jobs[0].id).stage
        wait("three workers ready", lambda: sum(1 for w in backend.store.workers() if w.get("state") in ("idle", "busy"))
             >= MAX_WORKERS, 300)
        gate.wait_reached(MAX_WORKERS, timeout=300)  # each new worker took a job (it is busy, not idle)
        gate.release()
        wait("6 jobs done", lambda: all(backend.get(j.id).status == "done" for j in jobs), 300)
        t_done = time.monotonic() - t0
        wait("no worker", lambda: not backend.pool.handles() and not backend.store.workers(), 120)
        t_retired = time.monotonic() - t0
        wait("no GPU node", lambda: timeline.sample()["nodes"] == 0, 180)
        t_no_nodes = time.monotonic() - t0
        time.sleep(2)
        t_again = time.monotonic() - t0
        again = backend.submit(GenerationParams.parse(prompt="from zero", seed=99, **JOB), SubmitOptions())
        waiting_again = backend.get(again.id).stage
        wait("the job from zero done", lambda: backend.get(again.id).status == "done", 300)
        t_again_done = time.monotonic() - t0
        time.sleep(1.5)
        timeline.stop()
        rows = timeline.rows
        records = [backend.get(j.id) for j in [*jobs, again]]
        figures = {
            "first_queued_to_first_worker_ready_s": timeline.first(0, lambda r: r["ready"] > 0),
            "first_queued_to_3_workers_ready_s": timeline.first(0, lambda r: r["ready"] >= MAX_WORKERS),
            "max_gpu_nodes": max(r["nodes"] for r in rows),
            "max_workers_ready": max(r["ready"] for r in rows),
            "six_jobs_done_s": round(t_done, 2),
            "idle_to_workers_retired_s": round(t_retired - t_done, 2),
            "idle_to_nodes_removed_s": round(t_no_nodes - t_done, 2),
            "from_zero_job_to_worker_ready_s": (lambda t: None if t is None else round(t - t_again, 2))(
                timeline.first(t_again, lambda r: r["ready"] > 0)),
            "from_zero_job_done_s": round(t_again_done - t_again, 2),
            "jobs_lost": sum(1 for r in records if r.status != "done"),
            "jobs_run_twice": sum(1 for r in records if r.attempts != 1),
            "videos": sum(1 for r in records if Path(r.artifacts.get("video", "/nonexistent")).is_file()),
            "stage_while_waiting": [waiting, waiting_again],
            "waiting_stage_name": WAITING_STAGE,
            "idle_timeout_s": scaling.idle_timeout_s,
            "node_idle_timeout_s": NODE_IDLE_MINUTES * 60,
        }
        marks = {"6 jobs queued": 0.0, "jobs done": t_done, "workers retired": t_retired,
                 "GPU nodes gone": t_no_nodes, "1 job queued": t_again}
        png = out / "autoscaling_timeline.png"
        plot(rows, marks, png)
        import av

        with av.open(records[-1].artifacts["video"]) as container:  # the job from zero, decoded
            figures["from_zero_video_frames"] = sum(1 for _ in container.decode(video=0))
        return {"figures": figures, "timeline": rows, "plot": str(png)}
    finally:
        if gate is not None:
            gate.release()
        if backend is not None:
            backend.close()
        import ray

        ray.shutdown()
        end_session(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    result = run(Path(sys.argv[1]))
    print(json.dumps(result))
