"""A worker of W GPUs (`gpus_per_worker` 2, 4 or 8): one video on all of them, in a layout chosen per job.

A gang is W Ray actors in one placement group (STRICT_PACK: the same node, one GPU each) that form a
torch.distributed group of W ranks (NCCL on CUDA, gloo on CPU):

- rank 0 is the pool's worker `mochi-worker-<i>` (a `GangWorker`): it claims jobs, heartbeats, reports
  progress, previews and encodes, like any worker, and picks each job's layout;
- ranks 1 to W-1 are `mochi-peer-<i>-<rank>` (`PeerActor`s): for each job rank 0 asks every one of them to run
  the same `MochiPipeline` call in the same layout; each takes its share of the decode and returns no frames.

The layout is the pipeline's `default_layout` (`mochi_lab.pipelines.cfg_parallel`): a guided job runs CFG 2 x
SP W/2 (its two samples on two halves of the gang, each half splitting the video's tokens), a job without CFG
SP over all W ranks. The job's meta records it (`layout`, `cfg_degree`, `sp_degree`, `ranks`). A video with
fewer visual tokens than its SP degree is refused before any work, without a retry. A job's LoRA adapters are
loaded on rank 0, then on every peer from the same files (`PeerActor.load_adapters`), before any rank starts;
each rank sets them for the job and disables them after. Each rank encodes the
prompt itself (why: docs/how-to/gpus.md).

Failure is per gang: a collective that fails mid-job (a rank died) exits that process at once, without
finishing the job, and the ranks still in that group find it gone in their next collective and exit too; Ray
restarts them, and the restarted rank 0 takes back its claims, so the job runs again (attempt + 1) like any
lost lease. A rank 0 that finds a peer restarted or gone, or a fresh rank 0 that finds peers still in an old
group, restarts the others too: the gang always re-forms as a unit, all W ranks new. A stop (a cancel, a lost
lease, an error in a step) stops every rank at the same step (`Parallel.synced_step`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from mochi_lab.config import PoolConfig
from mochi_lab.params import GenerationParams
from mochi_lab.pipelines import PipelineConfig, load_runner
from mochi_lab.pipelines.cfg_parallel import (
    Layout,
    LayoutError,
    Parallel,
    PeerLost,
    StoppedByPeer,
    backend_for,
    join_pair,
    rendezvous_store,
    visual_tokens,
)
from mochi_lab.worker.job import JobRejected, load_adapter
from mochi_lab.worker.loop import Worker, WorkerUnhealthy

log = logging.getLogger("mochi_lab.pool.gang")

PEER_PREFIX = "mochi-peer-"
# After rank 0 failed outside a synced step: how long peers that finished their share may take to return
PEER_SETTLE_S = 5.0


def group_name(namespace: str, index: int) -> str:
    """The placement group of gang `index` (placement group names are global: the namespace is in it)."""
    return f"mochi-gang-{namespace}-{index}"


def peer_name(index: int, rank: int) -> str:
    """The actor of rank `rank` (1 and up) of gang `index`."""
    return f"{PEER_PREFIX}{index}-{rank}"


def _exit_for_restart(why: str) -> None:
    """End this process now, mid-job or not; Ray restarts the actor (max_restarts=-1)."""
    log.error("%s; restarting this rank", why)
    logging.shutdown()
    os._exit(71)


class GangWorker(Worker):
    """Rank 0: a `Worker` that forms the gang before its first load, picks each job's layout and runs the
    other ranks beside it."""

    def __init__(self, *args: Any, peers: list[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.peer_names = list(peers)  # rank r is peer_names[r - 1]
        self.peers: list[Any] = []
        self.peer_pids: list[int] = []
        self.parallel: Parallel | None = None
        self.broken: str | None = None  # why this gang must restart once the job in hand is finished

    @property
    def world(self) -> int:
        return len(self.peer_names) + 1

    def _make_runner(self, model: str):
        runner = super()._make_runner(model)  # the peers load their copies meanwhile
        if self.parallel is None:
            try:
                self._join_peers(runner.device)
            except Exception as exc:  # serving alone would be wrong, and an "error" row serves nothing
                _exit_for_restart(f"could not form the gang with {', '.join(self.peer_names)}: {exc!r}")
        runner.enable_parallel(self.parallel)  # LayoutError (a load failure) where W does not divide the heads
        return runner

    def _wait_for_peers(self, deadline: float) -> list[Any]:
        """Every peer's handle, once each answers from outside any group; one still in an old group is asked to
        leave it (it restarts)."""
        import ray

        ready: dict[str, Any] = {}
        why: dict[str, str] = {}
        while True:
            asked = {}
            for name in self.peer_names:
                if name in ready:
                    continue
                try:
                    handle = ray.get_actor(name, namespace=self.settings.namespace)
                except ValueError as exc:  # not created yet
                    why[name] = repr(exc)
                    continue
                asked[name] = (handle, handle.ping.remote())
            if asked:
                ray.wait([ref for _, ref in asked.values()], num_returns=len(asked), timeout=10)
            for name, (handle, ref) in asked.items():
                try:
                    state = ray.get(ref, timeout=0)
                except Exception as exc:  # restarting, or still loading its model
                    why[name] = repr(exc)
                    continue
                if state["grouped"]:
                    handle.leave.remote()
                    why[name] = "still in an old group"
                else:
                    ready[name] = handle
            if len(ready) == len(self.peer_names):
                return [ready[name] for name in self.peer_names]
            if time.monotonic() > deadline:
                waiting = {name: why.get(name) for name in self.peer_names if name not in ready}
                raise TimeoutError(f"peers not ready after {self.settings.gang_timeout_s:g} s: {waiting}")
            time.sleep(0.5)

    def _join_peers(self, device) -> None:
        import ray

        timeout = self.settings.gang_timeout_s
        self.peers = self._wait_for_peers(time.monotonic() + timeout)
        backend, world = backend_for(device), self.world
        store = rendezvous_store(0, 0, timeout, world=world)
        joined = [peer.join.remote(store.port, backend, timeout, rank, world)
                  for rank, peer in enumerate(self.peers, start=1)]
        join_pair(store, 0, backend, timeout, world=world)
        self.parallel = Parallel(device, timeout_s=timeout)  # collective: every rank forms the layouts' groups
        self.peer_pids = ray.get(joined, timeout=timeout)
        self._facts["gang"] = {"ranks": world, "backend": backend,
                               "peers": dict(zip(self.peer_names, self.peer_pids))}
        log.info("formed a gang of %d ranks with %s (pids %s) over %s", world, ", ".join(self.peer_names),
                 self.peer_pids, backend, extra={"worker_id": self.worker_id})

    def _layout(self, params: GenerationParams) -> Layout:
        """This job's layout, by the plan's policy; refused (not retried: it would be refused again) when the
        video has fewer visual tokens than the layout's SP ranks."""
        layout = self.parallel.policy(self.world, params.guidance_scale > 1.0)
        config = self.runner.pipe.transformer.config
        try:
            layout.check(config.num_attention_heads,
                         visual_tokens(config, params.num_frames, params.height, params.width))
        except LayoutError as exc:
            raise JobRejected(str(exc)) from None
        return layout

    def _load_adapters(self, job, params: GenerationParams, reporter, meta: dict[str, Any]) -> list[tuple[str, float]]:
        """The job's adapters loaded here, then on every peer from the same content-addressed files (each rank
        checks the file again), before any rank starts the job: a peer that cannot load one fails the job
        (JobRejected, its reason) while no rank is in a collective. `lora_load_s` adds the slowest peer's load."""
        applied = super()._load_adapters(job, params, reporter, meta)
        if not applied:
            return applied
        import ray

        wanted = [(fact["name"], fact["sha256"]) for fact in meta["lora"] if fact["scale"] != 0.0]
        loading = [peer.load_adapters.remote(job.account, params.model, wanted) for peer in self.peers]
        deadline = time.monotonic() + self.settings.gang_timeout_s
        took = [0.0]
        for name, ref in zip(self.peer_names, loading):
            try:
                took.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.RayTaskError as exc:  # the peer answered: its refusal (or error) fails the job
                cause = getattr(exc, "cause", None)
                raise JobRejected(str(cause) if isinstance(cause, JobRejected)
                                  else f"lora: {name} could not load the adapters: {cause or exc!r}") from None
            except Exception as exc:  # died or stuck: like a peer lost mid-job, the job reruns on a fresh gang
                self._lost_mid_job(f"peer {name} lost while loading adapters: {exc!r}")
        meta["lora_load_s"] += max(took)
        return applied

    def _lost_mid_job(self, why: str) -> None:
        """The job is not finished here: the restart hands it back (attempt + 1)."""
        try:
            self.store.release_worker(self.worker_id)
        except Exception:  # the restarted rank 0 releases it too
            pass
        _exit_for_restart(why)

    def _generate(self, params: GenerationParams, on_step, plan, adapters=()):
        layout = self._layout(params)  # before any rank starts: a refusal costs the peers nothing
        running = [peer.generate.remote(params, layout, list(adapters)) for peer in self.peers]
        try:
            result = self.runner.generate(params, on_step, preview=plan, layout=layout)
        except PeerLost as exc:
            self._lost_mid_job(f"a peer lost mid-job: {exc}")
        except BaseException:
            if self.parallel.synced_stop:  # the peers stopped at the same step
                self._await_peers(running)
            else:  # failed outside a step (an OOM in a forward, the preview fit): the peers may wait in a
                # collective for rank 0 until it times out; the job fails now and the gang re-forms
                self._await_peers(running, PEER_SETTLE_S)
            raise
        self._await_peers(running)
        return result

    def _await_peers(self, running: list, timeout_s: float | None = None) -> None:
        import ray

        limit = min(timeout_s or self.settings.gang_timeout_s, self.settings.gang_timeout_s)
        deadline = time.monotonic() + limit
        for name, ref in zip(self.peer_names, running):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayTaskError:  # the peer's own error for this job; rank 0 reports its own
                log.warning("peer %s failed the job too", name, exc_info=True, extra={"worker_id": self.worker_id})
            except Exception as exc:  # died or stuck: this gang no longer works
                self.broken = f"peer {name} lost: {exc!r}"

    def check_health(self) -> dict[str, Any]:
        """The worker's own checks, and the peers': one gone, restarted, or out of the group ends the gang."""
        out = super().check_health()
        if self.broken:
            raise WorkerUnhealthy(f"worker {self.worker_id}: {self.broken}")
        if not self.peer_pids:
            return out
        import ray

        refs = [peer.ping.remote() for peer in self.peers]
        ray.wait(refs, num_returns=len(refs), timeout=2)
        states = []
        for name, pid, ref in zip(self.peer_names, self.peer_pids, refs):
            try:
                state = ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:  # a busy machine: the collectives' timeout still guards
                continue
            except Exception as exc:
                raise WorkerUnhealthy(f"worker {self.worker_id}: peer {name} is gone ({exc!r})") from None
            if state["pid"] != pid or not state["grouped"]:
                raise WorkerUnhealthy(f"worker {self.worker_id}: peer {name} restarted")
            states.append(state)
        return {**out, "peers": states}


class PeerActor:
    """Rank 1 to W-1: loads the pool's model, joins rank 0's group, and runs each job rank 0 hands it, in the
    layout rank 0 picked."""

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
        self.parallel: Parallel | None = None
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()  # one job at a time; ping and leave stay answerable meanwhile

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "grouped": self.parallel is not None, "model": self.runner.name,
                "rank": self.parallel.rank if self.parallel is not None else None, "last": dict(self.last)}

    def leave(self) -> None:
        """Restart this process (a group cannot be re-formed in place)."""
        _exit_for_restart("asked to leave its old group")

    def join(self, port: int, backend: str, timeout_s: float, rank: int, world: int) -> int:
        """Join rank 0's group as `rank` of `world`; returns this process's id."""
        if self.parallel is not None:
            self.leave()
        join_pair(rendezvous_store(rank, port, timeout_s, world=world), rank, backend, timeout_s, world=world)
        self.parallel = Parallel(self.runner.device, timeout_s=timeout_s)
        try:
            self.runner.enable_parallel(self.parallel)
        except LayoutError:  # rank 0 refuses this model the same way, and says so in its row
            log.exception("this model cannot run in the gang's layouts")
        return os.getpid()

    def _runner_for(self, model: str) -> Any:
        if model != self.runner.name:  # rank 0 loaded another model for this job
            self.runner = None
            self.runner = load_runner(model, self.settings.cache_dir, self.config)
            self.runner.enable_parallel(self.parallel)
        return self.runner

    def load_adapters(self, account: str, model: str, adapters: list[tuple[str, str]]) -> float:
        """Load a job's LoRA adapters ((name, sha256) pairs, those rank 0 loaded) from the account's files,
        checked again here; the seconds it took. JobRejected as rank 0 words it when one cannot be used."""
        with self._lock:
            cache = self._runner_for(model).lora
            cache.size = self.settings.lora_cache  # rank 0's size: the ranks keep the same adapters loaded
            took = sum(load_adapter(cache, self.settings, account, model, name, sha) for name, sha in adapters)
            cache.evict(keep=[sha for _, sha in adapters])
            return took

    def generate(self, params: GenerationParams, layout: Layout,
                 adapters: list[tuple[str, float]] = ()) -> dict[str, Any]:
        """This rank's share of one job, with the LoRA `adapters` ((sha256, scale), loaded by `load_adapters`)
        set for it and disabled after, as on rank 0; returns how it ended."""
        with self._lock:
            self._runner_for(params.model)
            self.parallel.reset_stats()
            self.last = {"seed": params.seed, "layout": layout.name, "steps": 0, "outcome": "running",
                         "lora": [sha for sha, _ in adapters]}

            def on_step(step: int, total: int) -> None:
                self.last["steps"] = step

            try:
                with self.runner.lora.applied(adapters):
                    result = self.runner.generate(params, on_step, decode=self.runner.split_decode, layout=layout)
                self.last.update(outcome="done", decode_ranks=result.info.get("decode_ranks"))
            except StoppedByPeer:
                self.last["outcome"] = "stopped"
            except PeerLost as exc:
                _exit_for_restart(f"a rank lost mid-job: {exc}")
            self.last["stats"] = dict(self.parallel.stats)
            return dict(self.last)


def start(ray: Any, settings: PoolConfig, index: int, leader_cls: Any, leader_args: tuple, options: dict) -> None:
    """Create gang `index` of `settings.gpus_per_worker` ranks (its placement group, the peers, then rank 0
    from `leader_cls`) unless it exists. `options` are the pool's actor options; each rank gets one bundle of
    the group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = settings.gpus_per_worker
    gpu = {"GPU": 1} if options.get("num_gpus") else {}
    bundles = [{"CPU": settings.cpus_per_worker, **gpu, **settings.worker_resources}]
    bundles += [{"CPU": settings.cpus_per_worker, **gpu} for _ in range(world - 1)]
    name = group_name(settings.namespace, index)
    try:
        pg = ray.util.get_placement_group(name)
    except ValueError:
        pg = ray.util.placement_group(bundles, strategy="STRICT_PACK", name=name, lifetime="detached")
    else:
        if pg.bundle_count != world:  # left by a pool of another shape
            raise ValueError(f"placement group {name} has {pg.bundle_count} bundles, and gpus_per_worker is {world}: "
                             f"shut the pool down (cluster.shutdown_pool()) before changing gpus_per_worker")
    common = {k: v for k, v in options.items() if k not in ("scheduling_strategy", "resources", "name")}
    placed = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r) for r in range(world)]
    _, settings_json, model, config = leader_args  # the peers serve the leader's model with its config
    peers = [peer_name(index, rank) for rank in range(1, world)]
    for rank, peer in enumerate(peers, start=1):
        ray.remote(PeerActor).options(name=peer, scheduling_strategy=placed[rank],
                                      **common).remote(settings_json, model, config)
    leader_cls.options(name=leader_args[0], scheduling_strategy=placed[0], resources=options.get("resources"),
                       **common).remote(*leader_args, gang={"peers": peers})


def remove(ray: Any, namespace: str, keep_below: int = 0, *, index: int | None = None) -> None:
    """Kill the peers and remove the placement groups of gang `index`, or of gangs `keep_below` and up (their
    leaders are stopped, or retired, by the pool)."""
    def chosen(i: int) -> bool:
        return i == index if index is not None else i >= keep_below

    prefix = group_name(namespace, 0)[:-1]
    peers = re.compile(rf"{re.escape(PEER_PREFIX)}(\d+)-\d+")
    for entry in ray.util.list_named_actors(all_namespaces=True):  # whatever shape their gang had
        found = peers.fullmatch(entry["name"])
        if entry["namespace"] != namespace or not found or not chosen(int(found.group(1))):
            continue
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
        except ValueError:  # already gone
            pass
    for row in ray.util.placement_group_table().values():
        name = row.get("name") or ""
        if row.get("state") == "REMOVED" or not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        if chosen(int(name[len(prefix):])):
            ray.util.remove_placement_group(ray.util.get_placement_group(name))
