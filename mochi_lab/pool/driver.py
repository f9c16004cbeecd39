"""The warm pool: detached, named Ray actors (one per GPU) that each run a `Worker`.

Actors are named `mochi-worker-<i>` in the settings' namespace, so a new handle finds and reuses
them instead of loading the model again. Actors are spread over nodes and restart forever, so a
lost node costs its jobs one attempt, not the pool.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mochi_lab.config import PoolConfig, WorkerConfig, default_ray_env, node_redis_url, set_ray_env, without_credentials
from mochi_lab.model import wait_workers_ready
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.private import PRIVATE_UMASK
from mochi_lab.store import Store

log = logging.getLogger(__name__)

ACTOR_PREFIX = "mochi-worker-"
T = TypeVar("T")


def _import_ray():
    # Without this, Ray may advertise the machine's external address even for a local cluster.
    default_ray_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    import ray

    return ray


def store_url_here(sent: str | None) -> str | None:
    """A worker's store URL: its node's own REDIS_URL (on a cluster, the worker's least-privilege user),
    else the creator's, which arrives without credentials (a local, password-less Redis)."""
    return node_redis_url() or sent


class WorkerActor:
    """Ray wrapper around `Worker`; the worker's loop runs in its own thread.

    The actor's health is its loop's health: a watchdog thread calls `Worker.check_health()` every
    `health_check_s` and, when it fails (a dead or wedged loop, a cancel ignored past its grace, a job
    past its maximum run time), exits the process, so that Ray restarts the actor (max_restarts=-1).
    The restarted actor's worker first takes back the jobs its previous life held (`release_worker`).
    """

    def __init__(self, worker_id: str, settings: dict, model: str, config: dict, gang: dict | None = None):
        from mochi_lab.logs import JsonFormatter
        from mochi_lab.worker.loop import Worker

        os.umask(PRIVATE_UMASK)  # its videos are its user's alone (this process is the actor's own)
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger("mochi_lab")
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        import ray

        node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
        settings = {**settings, "redis_url": store_url_here(settings.get("redis_url"))}
        if gang:  # rank 0 of a 2-GPU worker (see mochi_lab.pool.gang)
            from mochi_lab.pool.gang import GangWorker

            self.worker = GangWorker(worker_id, PoolConfig(**settings), model, PipelineConfig(**config), facts=node,
                                     **gang)
        else:
            self.worker = Worker(worker_id, WorkerConfig(**settings), model, PipelineConfig(**config), facts=node)
        self.worker.start()
        self._stopping = False
        self._watchdog = threading.Thread(target=self._watch, name="mochi-watchdog", daemon=True)
        self._watchdog.start()

    def pid(self) -> int:
        """This actor's process: the pool tells its rows in the store from a killed process's (`Pool.wait_ready`)."""
        return os.getpid()

    def check_health(self) -> dict[str, Any]:
        """Raises WorkerUnhealthy when the worker must be restarted (see `Worker.check_health`)."""
        return self.worker.check_health()

    def _watch(self) -> None:
        from mochi_lab.worker.loop import WorkerUnhealthy

        period = self.worker.settings.health_check_s
        while not self._stopping:
            time.sleep(period)
            if self._stopping:
                return
            try:
                self.worker.check_health()
            except WorkerUnhealthy as exc:
                log.error("%s; restarting this worker", exc)
                _restart_process(self.worker)
            except Exception:
                log.exception("health check failed")

    def stop(self, timeout: float = 600.0) -> None:
        self._stopping = True
        self.worker.stop(timeout)

    def tokenizer_files(self, model: str) -> dict[str, bytes] | None:
        """`model`'s tokenizer files from this worker's machine (for a gateway, which has no model files)."""
        from mochi_lab.pipelines.tokens import tokenizer_files

        return tokenizer_files(model, self.worker.settings.cache_dir)

    def retire(self) -> None:
        """Stop claiming, finish the job in hand however long it takes, then end this actor for good
        (no restart): its GPU, and then its node, are free. Never interrupts a job."""
        import ray

        self.stop(timeout=None)
        ray.actor.exit_actor()


def _restart_process(worker) -> None:
    """Exit at once (no cleanup that a wedged thread could block); Ray restarts the actor."""
    try:
        worker.store.release_worker(worker.worker_id)
    except Exception:  # the restarted worker releases them too
        pass
    logging.shutdown()
    os._exit(70)


class _HeldLogs(logging.Handler):
    """Keeps log records instead of writing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def quiet_ray_start() -> Iterator[_HeldLogs]:
    """Hold back the "ray" logger's lines while Ray starts or joins (INFO "Started a local Ray instance",
    the token-auth WARNING, ...): in a notebook they are a red stderr box on every `MochiCluster()`.
    When the start fails, the held lines are written out after all, through Ray's own handlers, so
    that what Ray said about the failure is shown with it. Later Ray messages are not affected."""
    logger = logging.getLogger("ray")
    held = _HeldLogs()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:] = [held]
    logger.propagate = False
    failed = False
    try:
        yield held
    except BaseException:
        failed = True
        raise
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        if failed:
            for record in held.records:
                logger.handle(record)


def connect(settings: PoolConfig) -> str:
    """Join the Ray cluster at settings.ray_address, or start a local one on loopback. Returns its address.

    Ray's start-up log lines are shown only if the start fails (see `quiet_ray_start`)."""
    ray = _import_ray()
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        wanted = settings.ray_address
        if wanted and not wanted.startswith("ray://") and wanted not in ("auto", current):
            raise RuntimeError(f"this process is already connected to Ray at {current}, not {wanted}")
    else:
        with quiet_ray_start():
            _on_lasting_thread(lambda: _start(ray, settings))
    if settings.ray_address and settings.ray_address.startswith("ray://"):
        return settings.ray_address  # a Ray Client session has no GCS address of its own
    return ray.get_runtime_context().gcs_address


class _LastingThread:
    """One daemon thread, alive as long as the process, that runs the calls it is given, one at a time."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="mochi-ray-owner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, done = self._calls.get()
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        done: Future = Future()
        self._calls.put((fn, done))
        return done.result()


_owner: _LastingThread | None = None
_owner_lock = threading.Lock()


def _on_lasting_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a thread that lives as long as the process: this one if it is the main thread, else a
    dedicated one. Ray ties the processes a local start forks (GCS, raylet, ...) to the *thread* that forked
    them (PR_SET_PDEATHSIG): they are SIGKILLed when it exits. A pool's worker thread exits when idle
    (anyio's after 10 s: the gateway's lifespan, a sync route), and so may a widget's or an executor's."""
    global _owner
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _owner_lock:
        if _owner is None:
            _owner = _LastingThread()
    return _owner.call(fn)


def _start(ray: Any, settings: PoolConfig) -> None:
    if _on_loopback(settings.ray_address):
        _loopback_only(ray)
    if settings.ray_address:
        # Ray Client starts a server process per client; on a loaded head that process can die while
        # starting (seen on 2 cores: "Initialization failure from server"). A new one usually starts.
        _init_with_one_retry(ray, dict(address=settings.ray_address, namespace=settings.namespace, log_to_driver=False),
                             lambda exc: isinstance(exc, ConnectionAbortedError)
                             and settings.ray_address.startswith("ray://"),
                             "Ray Client's server for this session failed to start")
    else:
        # "local" starts a new Ray even when another one runs on this machine; it picks free
        # ports for itself (never Redis' 6379) and stays on 127.0.0.1. Ray waits a fixed 30 s for its
        # node agents; a loaded laptop can miss that once.
        _init_with_one_retry(ray, dict(address="local", namespace=settings.namespace, include_dashboard=False,
                                       _node_ip_address="127.0.0.1", log_to_driver=False),
                             lambda exc: "timed out during startup" in str(exc), "local Ray was slow to start")
        node_ip = ray._private.worker.global_worker.node.node_ip_address
        if not ipaddress.ip_address(node_ip).is_loopback:
            ray.shutdown()
            raise RuntimeError(f"the local Ray started on {node_ip}, not on loopback; refusing to run it there")
        from mochi_lab.pool import reaper

        # Ray's own processes would outlive a SIGKILLed owner: a watcher ends them then.
        reaper.start(os.getpid(), ray._private.worker.global_worker.node.get_session_dir_path())


def _on_loopback(address: str | None) -> bool:
    """Whether `address` (None: a Ray to start here) is a Ray on this machine's loopback."""
    if not address:
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_only(ray: Any) -> None:
    """Keep this process's Ray on loopback: a local Ray it starts listens there only, and one it joins
    there is reached there. Ray replaces 127.0.0.1, as a node's address or a GCS address to join, by the
    machine's own address (and a Ray it starts then listens on every interface), unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER was 0 when Ray was first imported. A process that imported Ray
    before mochi_lab (a notebook's `import ray`) read it too early: the value Ray read is set as well.
    Ray's own processes import Ray afresh and read the variable."""
    set_ray_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def _init_with_one_retry(ray: Any, kwargs: dict[str, Any], transient: Callable[[Exception], bool], what: str) -> None:
    """ray.init(**kwargs), once more after a failure that `transient` says a second try may not repeat."""
    try:
        ray.init(**kwargs)
    except Exception as exc:
        if not transient(exc):
            raise
        last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        log.warning("%s (%s); trying once more", what, last_line[:200])
        ray.shutdown()
        ray.init(**kwargs)


class Pool:
    """Creates, finds, scales and stops the worker actors."""

    def __init__(self, settings: PoolConfig, store: Store, model: str = "tiny", config: PipelineConfig | None = None):
        self.settings = settings
        self.store = store
        self.model = model
        self.config = config or PipelineConfig()
        self.ray = _import_ray()

    def _cluster_gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def handles(self) -> dict[str, Any]:
        """Live pool actors by name."""
        found = {}
        for actor in self.ray.util.list_named_actors(all_namespaces=True):
            name, ns = actor["name"], actor["namespace"]
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
        if n is None:  # one worker per GPU (per 2 GPUs for 2-GPU workers), or one on a CPU-only cluster
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
        actor_cls = self.ray.remote(WorkerActor)
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

    def shutdown(self) -> None:
        self._stop(list(self.handles().values()))
        self._remove_gangs(0)

    def _remove_gangs(self, keep_below: int) -> None:
        """2-GPU workers: their peers and placement groups go with their stopped leaders."""
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
