"""The warm pool's driver: creates, finds, scales and stops detached, named Ray actors (one per GPU) that each
run a `Worker` (`pool.actor.WorkerActor`).

Actors are named `mochi-worker-<i>` in the settings' namespace, so a new handle finds and reuses
them instead of loading the model again. Actors are spread over nodes and restart forever, so a
lost node costs its jobs one attempt, not the pool.
"""

from __future__ import annotations

import logging
from typing import Any

from mochi_lab._moved import moved_names
from mochi_lab.config import PoolConfig, without_credentials
from mochi_lab.model import wait_workers_ready
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool import actor
from mochi_lab.pool.connection import import_ray
from mochi_lab.store import Store

log = logging.getLogger(__name__)

ACTOR_PREFIX = "mochi-worker-"
# The actor (pool.actor) and this process's Ray connection (pool.connection) had their home here.
__getattr__ = moved_names(__name__)


class Pool:
    """Creates, finds, scales and stops the worker actors."""

    def __init__(self, settings: PoolConfig, store: Store, model: str = "tiny", config: PipelineConfig | None = None):
        self.settings = settings
        self.store = store
        self.model = model
        self.config = config or PipelineConfig()
        self.ray = import_ray()

    def _cluster_gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def handles(self) -> dict[str, Any]:
        """Live pool actors by name."""
        found = {}
        for entry in self.ray.util.list_named_actors(all_namespaces=True):
            name, ns = entry["name"], entry["namespace"]
            if ns == self.settings.namespace and name.startswith(ACTOR_PREFIX):
                try:
                    found[name] = self.ray.get_actor(name, namespace=ns)
                except ValueError:  # died between listing and lookup
                    pass
        return dict(sorted(found.items(), key=lambda kv: int(kv[0][len(ACTOR_PREFIX):])))

    def ensure(self, n: int | None = None) -> list[str]:
        """Start missing actors until the pool has `n` (default: one per GPU); re-attaches to existing ones."""
        gpus = self._cluster_gpus()
        per = self.settings.gpus_per_worker
        if n is None:  # one worker per GPU (per gang of gpus_per_worker GPUs), or one on a CPU-only cluster
            n = self.settings.workers if self.settings.workers is not None else gpus // per or 1
        existing = self.handles()
        self.check(existing)
        options: dict[str, Any] = {
            "lifetime": "detached",
            "namespace": self.settings.namespace,
            "max_restarts": -1,
            "max_concurrency": 4,
            "scheduling_strategy": "SPREAD",
            "num_gpus": 1 if (gpus if self.settings.gpu_workers is None else self.settings.gpu_workers) else 0,
            # Ray sets a worker's torch threads (OMP_NUM_THREADS) from its num_cpus
            "num_cpus": self.settings.cpus_per_worker,
            "resources": self.settings.worker_resources or None,
            "get_if_exists": True,
        }
        actor_cls = self.ray.remote(actor.WorkerActor)
        # never the creator's store password: Ray keeps an actor's arguments in its GCS (see store_url_here)
        settings = self.settings.model_dump(mode="json")
        settings["redis_url"] = without_credentials(settings.get("redis_url"))  # the creator keeps them
        for i in range(n):
            name = f"{ACTOR_PREFIX}{i}"
            if name in existing:
                continue
            args = (name, settings, self.model, self.config.model_dump())
            if per > 1:
                from mochi_lab.pool import gang

                gang.start(self.ray, self.settings, i, actor_cls, args, options)
            else:
                actor_cls.options(name=name, **options).remote(*args)
        return [f"{ACTOR_PREFIX}{i}" for i in range(n)]

    def check(self, handles: dict[str, Any] | None = None, timeout: float = 5.0) -> list[str]:
        """Ask each actor for its health; restart those whose worker says it is dead or wedged, after
        taking back their jobs. An actor that does not answer in time (busy starting) is left alone:
        each actor's own watchdog restarts it too. Returns the names restarted."""
        handles = self.handles() if handles is None else handles
        refs = {name: h.check_health.remote() for name, h in handles.items()}
        if refs:  # one deadline for all of them
            self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        restarted = []
        for name, ref in refs.items():
            try:
                self.ray.get(ref, timeout=0)
            except self.ray.exceptions.RayTaskError as exc:  # the worker's own verdict: unhealthy
                log.error("worker %s is unhealthy (%s); restarting it", name, exc)
                try:
                    self.store.release_worker(name)
                except Exception:
                    log.warning("could not release the jobs of %s", name)
                self.ray.kill(handles[name], no_restart=False)
                restarted.append(name)
            except Exception as exc:  # restarting, dead for good, or slow: Ray and the watchdog handle it
                log.info("worker %s did not answer its health check: %r", name, exc)
        return restarted

    def scale(self, n: int) -> None:
        """Grow to `n` actors, or drain and stop those above `n`."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.ensure(n)
        extra = [h for name, h in self.handles().items() if int(name[len(ACTOR_PREFIX):]) >= n]
        self._stop(extra)
        self._remove_gangs(n)

    def retire(self, names: list[str]) -> dict[str, Any]:
        """Ask these workers to retire (`WorkerActor.retire`): each stops claiming, finishes its job and
        exits. Returns name -> the call's ref, resolved (with an ActorDiedError) when the actor has gone."""
        handles = self.handles()
        return {name: handles[name].retire.remote() for name in names if name in handles}

    def forget(self, names: list[str]) -> None:
        """Workers gone for good (retired): a gang's peers and placement group go too, so that its GPUs, and
        then its node, are free."""
        if self.settings.gpus_per_worker > 1:
            from mochi_lab.pool import gang

            for name in names:
                gang.remove(self.ray, self.settings.namespace, index=int(name[len(ACTOR_PREFIX):]))

    def shutdown(self) -> None:
        self._stop(list(self.handles().values()))
        self._remove_gangs(0)

    def _remove_gangs(self, keep_below: int) -> None:
        """Gangs (gpus_per_worker > 1): their peers and placement groups go with their stopped leaders."""
        if self.settings.gpus_per_worker > 1:
            from mochi_lab.pool import gang

            gang.remove(self.ray, self.settings.namespace, keep_below)

    def _stop(self, handles: list) -> None:
        refs = [h.stop.remote() for h in handles]
        try:
            self.ray.get(refs, timeout=self.settings.lease_s * 2)
        except Exception:  # a dead or stuck actor is killed regardless
            log.warning("some workers did not drain in time")
        for h in handles:
            self.ray.kill(h, no_restart=True)

    def tokenizer_files(self, model: str, timeout: float = 5.0) -> dict[str, bytes] | None:
        """`model`'s tokenizer files from a live worker (at most two asked, `timeout` s each); None if none
        answers with them (none started yet, or none has that model's files)."""
        for handle in list(self.handles().values())[:2]:
            try:
                files = self.ray.get(handle.tokenizer_files.remote(model), timeout=timeout)
            except Exception as exc:  # a worker restarting or busy starting: the next, or none
                log.info("no tokenizer from a worker: %s", type(exc).__name__)
                continue
            if files:
                return files
        return None

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every pool worker has loaded its model: its row in the store, written by its actor's
        current process, says idle or busy (`model.workers_ready`). A restarted actor's killed process left
        a row that says what it last said until its TTL: that row does not count."""
        wait_workers_ready(self.store.workers, timeout, processes=_Processes(self.ray, self.handles()))


class _Processes:
    """Each actor's current process id, asked anew on each call: an actor that has not answered since the
    last call (starting, restarting, gone) has None. At most one question waits per actor."""

    def __init__(self, ray: Any, handles: dict[str, Any], wait_s: float = 0.5) -> None:
        self.ray, self.handles, self.wait_s = ray, handles, wait_s
        self.asked: dict[str, Any] = {}

    def __call__(self) -> dict[str, int | None]:
        for name, handle in self.handles.items():
            if name not in self.asked:
                self.asked[name] = handle.pid.remote()
        refs = list(self.asked.values())
        answered, _ = self.ray.wait(refs, num_returns=len(refs), timeout=self.wait_s) if refs else ([], [])
        answered = set(answered)
        pids: dict[str, int | None] = {}
        for name in self.handles:
            ref = self.asked[name]
            pids[name] = None
            if ref in answered:
                del self.asked[name]
                try:
                    pids[name] = self.ray.get(ref)
                except Exception as exc:  # died while asked: the next question goes to its next process
                    log.info("worker %s did not say its process: %s", name, type(exc).__name__)
        return pids


__all__ = ["ACTOR_PREFIX", "Pool"]
