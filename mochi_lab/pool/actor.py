"""A pool worker's Ray actor: one `Worker` in the actor's own process, with a watchdog that exits the process
when the worker is unhealthy (Ray then restarts the actor), and a retire that ends it for good.

`pool.driver.Pool` creates these as detached, named actors; this module runs inside them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from mochi_lab.config import PoolConfig, WorkerConfig, node_redis_url
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.private import PRIVATE_UMASK

log = logging.getLogger(__name__)


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
        if gang:  # rank 0 of a worker of several GPUs (see mochi_lab.pool.gang)
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


__all__ = ["WorkerActor", "store_url_here"]
