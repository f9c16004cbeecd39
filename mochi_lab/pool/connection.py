"""This process's Ray: join the cluster at an address, or start a local one on loopback (`connect`).

Ray's start-up lines are held back unless the start fails, and a local Ray is started on a thread that lasts as
long as the process (Ray ties the processes it forks to the thread that forked them).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mochi_lab.config import PoolConfig, default_ray_env, set_ray_env

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a local Ray's driver waits for its raylet to register with the GCS (Ray's default is 30 s).
RAYLET_REGISTRATION_WAIT_S = 120


def import_ray():
    """Ray, imported with this package's defaults for its environment."""
    # Without this, Ray may advertise the machine's external address even for a local cluster.
    default_ray_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    import ray

    return ray



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
    ray = import_ray()
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
        # ports for itself (never Redis' 6379) and stays on 127.0.0.1. A busy laptop can keep its raylet
        # from registering within Ray's 30 s: the driver's own wait is lengthened (Ray's Python side has
        # a fixed one of its own, hence the second try).
        default_ray_env(RAY_raylet_start_wait_time_s=str(RAYLET_REGISTRATION_WAIT_S))
        _init_with_one_retry(ray, dict(address="local", namespace=settings.namespace, include_dashboard=False,
                                       _node_ip_address="127.0.0.1", log_to_driver=False),
                             slow_local_start, "local Ray was slow to start")
        node_ip = ray._private.worker.global_worker.node.node_ip_address
        if not ipaddress.ip_address(node_ip).is_loopback:
            ray.shutdown()
            raise RuntimeError(f"the local Ray started on {node_ip}, not on loopback; refusing to run it there")
        from mochi_lab.pool import reaper

        # Ray's own processes would outlive a SIGKILLed owner: a watcher ends them then.
        reaper.start(os.getpid(), ray._private.worker.global_worker.node.get_session_dir_path())


def slow_local_start(exc: Exception) -> bool:
    """Whether ray.init's failure to start a local Ray is one of its registration waits running out."""
    text = str(exc)
    return "timed out during startup" in text or "node registration may not be complete" in text


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


__all__ = ["connect", "import_ray", "quiet_ray_start"]
