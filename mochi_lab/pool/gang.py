"""A worker of two GPUs (`gpus_per_worker=2`): one video on both, classifier-free guidance in parallel.

A gang is two Ray actors in one placement group (STRICT_PACK: the same node, one GPU each) that form a
torch.distributed pair (NCCL on CUDA, gloo on CPU):

- rank 0 is the pool's worker `mochi-worker-<i>` (a `GangWorker`): it claims jobs, heartbeats, reports
  progress, previews and encodes, like any worker;
- rank 1 is `mochi-peer-<i>` (a `PeerActor`): for each guided job rank 0 asks it to run the same
  `MochiPipeline` call, without a decode. The transformer's CFG batch is split between them
  (`mochi_lab.pipelines.cfg_parallel`). Each rank encodes the prompt itself (why: docs/how-to/gpus.md).

A job without CFG (guidance <= 1) runs on rank 0 alone; rank 1 idles.

Failure is per gang: a collective that fails mid-job (the other rank died) exits that process at once,
without finishing the job; Ray restarts it, and the restarted rank 0 takes back its claims, so the job
runs again (attempt + 1) like any lost lease. A rank 0 that finds its peer restarted, or a fresh rank 0
that finds the peer still in an old group, restarts the other too: the pair always re-forms as a unit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from mochi_lab.config import PoolConfig
from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import PipelineConfig, load_runner
from mochi_lab.pipelines.cfg_parallel import (
    CfgParallel,
    PeerLost,
    StoppedByPeer,
    backend_for,
    join_pair,
    rendezvous_store,
)
from mochi_lab.worker.loop import Worker, WorkerUnhealthy

log = logging.getLogger("mochi_lab.pool.gang")

PEER_PREFIX = "mochi-peer-"
# After rank 0 failed outside a synced step: how long a peer that finished its half may take to return
PEER_SETTLE_S = 5.0


def group_name(namespace: str, index: int) -> str:
    """The placement group of gang `index` (placement group names are global: the namespace is in it)."""
    return f"mochi-gang-{namespace}-{index}"


def _exit_for_restart(why: str) -> None:
    """End this process now, mid-job or not; Ray restarts the actor (max_restarts=-1)."""
    log.error("%s; restarting this rank", why)
    logging.shutdown()
    os._exit(71)


class GangWorker(Worker):
    """Rank 0: a `Worker` that forms the pair before its first load and runs rank 1 beside each guided job."""

    def __init__(self, *args: Any, peer: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.peer_name = peer
        self.peer = None
        self.peer_pid: int | None = None
        self.parallel: CfgParallel | None = None
        self.broken: str | None = None  # why this gang must restart once the job in hand is finished

    def _make_runner(self, model: str):
        runner = super()._make_runner(model)  # the peer loads its copy meanwhile
        if self.parallel is None:
            try:
                self._join_peer(runner.device)
            except Exception as exc:  # serving alone would be wrong, and an "error" row serves nothing
                _exit_for_restart(f"could not form the gang with {self.peer_name}: {exc!r}")
        runner.enable_cfg_parallel(self.parallel)
        return runner

    def _join_peer(self, device) -> None:
        import ray

        timeout = self.settings.gang_timeout_s
        deadline = time.monotonic() + timeout
        while True:  # wait for a peer outside any group (one still in an old group restarts itself)
            try:
                self.peer = ray.get_actor(self.peer_name, namespace=self.settings.namespace)
                state = ray.get(self.peer.ping.remote(), timeout=10)
                if not state["grouped"]:
                    break
                self.peer.leave.remote()
            except Exception as exc:  # not created yet, restarting, or still loading its model
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer {self.peer_name} not ready after {timeout:g} s: {exc!r}") from None
            time.sleep(0.5)
        backend = backend_for(device)
        store = rendezvous_store(0, 0, timeout)
        joined = self.peer.join.remote(store.port, backend, timeout)
        join_pair(store, 0, backend, timeout)
        self.peer_pid = ray.get(joined, timeout=timeout)
        self.parallel = CfgParallel(device)
        self._facts["gang"] = {"peer": self.peer_name, "peer_pid": self.peer_pid, "backend": backend}
        log.info("formed the gang with %s (pid %s) over %s", self.peer_name, self.peer_pid, backend,
                 extra={"worker_id": self.worker_id})

    def _generate(self, params: GenerationParams, on_step, plan):
        if params.guidance_scale <= 1.0:  # batch 1: nothing to split, the peer idles
            return super()._generate(params, on_step, plan)
        running = self.peer.generate.remote(params)
        try:
            result = super()._generate(params, on_step, plan)
        except PeerLost as exc:  # the job is not finished here: the restart hands it back (attempt + 1)
            try:
                self.store.release_worker(self.worker_id)
            except Exception:  # the restarted rank 0 releases it too
                pass
            _exit_for_restart(f"peer lost mid-job: {exc}")
        except BaseException:
            if self.parallel.synced_stop:  # the peer stopped at the same step
                self._await_peer(running)
            else:  # failed outside a step (an OOM in a forward, the preview fit): the peer may wait in
                # a collective for rank 0 until it times out; the job fails now and the pair re-forms
                self._await_peer(running, PEER_SETTLE_S)
            raise
        self._await_peer(running)
        return result

    def _await_peer(self, running, timeout_s: float | None = None) -> None:
        import ray

        try:
            ray.get(running, timeout=min(timeout_s or self.settings.gang_timeout_s, self.settings.gang_timeout_s))
        except ray.exceptions.RayTaskError:  # the peer's own error for this job; rank 0 reports its own
            log.warning("peer failed the job too", exc_info=True, extra={"worker_id": self.worker_id})
        except Exception as exc:  # died or stuck: this pair no longer works
            self.broken = f"peer {self.peer_name} lost: {exc!r}"

    def check_health(self) -> dict[str, Any]:
        """The worker's own checks, and the peer's: gone, restarted, or out of the group ends the gang."""
        out = super().check_health()
        if self.broken:
            raise WorkerUnhealthy(f"worker {self.worker_id}: {self.broken}")
        if self.peer_pid is None:
            return out
        import ray

        try:
            state = ray.get(self.peer.ping.remote(), timeout=2)
        except ray.exceptions.GetTimeoutError:  # a busy machine: the collectives' timeout still guards
            return out
        except Exception as exc:
            raise WorkerUnhealthy(f"worker {self.worker_id}: peer {self.peer_name} is gone ({exc!r})") from None
        if state["pid"] != self.peer_pid or not state["grouped"]:
            raise WorkerUnhealthy(f"worker {self.worker_id}: peer {self.peer_name} restarted")
        return {**out, "peer": state}


class PeerActor:
    """Rank 1: loads the pool's model, joins rank 0's group, and runs the guided jobs rank 0 hands it."""

    def __init__(self, settings: dict, model: str, config: dict):
        from mochi_lab.logs import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger("mochi_lab")
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        self.settings = PoolConfig(**settings)
        self.config = PipelineConfig(**config)
        self.runner = load_runner(model, self.settings.cache_dir, self.config)
        self.parallel: CfgParallel | None = None
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()  # one job at a time; ping and leave stay answerable meanwhile

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "grouped": self.parallel is not None, "model": self.runner.name,
                "last": dict(self.last)}

    def leave(self) -> None:
        """Restart this process (a group cannot be re-formed in place)."""
        _exit_for_restart("asked to leave its old group")

    def join(self, port: int, backend: str, timeout_s: float) -> int:
        if self.parallel is not None:
            self.leave()
        join_pair(rendezvous_store(1, port, timeout_s), 1, backend, timeout_s)
        self.parallel = CfgParallel(self.runner.device)
        self.runner.enable_cfg_parallel(self.parallel)
        return os.getpid()

    def generate(self, params: GenerationParams) -> dict[str, Any]:
        """Rank 1's half of one guided job; returns how it ended."""
        with self._lock:
            if params.model != self.runner.name:  # rank 0 loaded another model for this job
                self.runner = None
                self.runner = load_runner(params.model, self.settings.cache_dir, self.config)
                self.runner.enable_cfg_parallel(self.parallel)
            self.parallel.reset_stats()
            self.last = {"seed": params.seed, "steps": 0, "outcome": "running"}

            def on_step(step: int, total: int) -> None:
                self.last["steps"] = step

            try:
                self.runner.generate(params, on_step, decode=False)
                self.last["outcome"] = "done"
            except StoppedByPeer:
                self.last["outcome"] = "stopped"
            except PeerLost as exc:
                _exit_for_restart(f"rank 0 lost mid-job: {exc}")
            self.last["stats"] = dict(self.parallel.stats)
            return dict(self.last)


def start(ray: Any, settings: PoolConfig, index: int, leader_cls: Any, leader_args: tuple, options: dict) -> None:
    """Create gang `index` (its placement group, rank 1, then rank 0 from `leader_cls`) unless it exists.
    `options` are the pool's actor options; each rank gets one bundle of the group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpu = {"GPU": 1} if options.get("num_gpus") else {}
    bundles = [{"CPU": settings.cpus_per_worker, **gpu, **settings.worker_resources},
               {"CPU": settings.cpus_per_worker, **gpu}]
    name = group_name(settings.namespace, index)
    try:
        pg = ray.util.get_placement_group(name)
    except ValueError:
        pg = ray.util.placement_group(bundles, strategy="STRICT_PACK", name=name, lifetime="detached")
    common = {k: v for k, v in options.items() if k not in ("scheduling_strategy", "resources", "name")}
    placed = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r) for r in (0, 1)]
    _, settings_json, model, config = leader_args  # the peer serves the leader's model with its config
    ray.remote(PeerActor).options(name=f"{PEER_PREFIX}{index}", scheduling_strategy=placed[1],
                                  **common).remote(settings_json, model, config)
    leader_cls.options(name=leader_args[0], scheduling_strategy=placed[0], resources=options.get("resources"),
                       **common).remote(*leader_args, gang={"peer": f"{PEER_PREFIX}{index}"})


def remove(ray: Any, namespace: str, keep_below: int = 0) -> None:
    """Kill the peers and remove the placement groups of gangs `keep_below` and up (their leaders are
    stopped by the pool)."""
    prefix = group_name(namespace, 0)[:-1]
    for row in ray.util.placement_group_table().values():
        name = row.get("name") or ""
        if row.get("state") == "REMOVED" or not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        index = int(name[len(prefix):])
        if index < keep_below:
            continue
        try:
            ray.kill(ray.get_actor(f"{PEER_PREFIX}{index}", namespace=namespace), no_restart=True)
        except ValueError:  # already gone
            pass
        ray.util.remove_placement_group(ray.util.get_placement_group(name))
