"""A cheap real pool for the tests of everything above the pool (client, widgets, experiments, gateway):
the real `Worker` loop in threads of the test process, over the real store, with no Ray (in the spirit of
arq's burst worker). Tests of Ray itself (the pool, the gang, the controller, autoscaling, faults) use the
`ray_cluster` fixtures instead."""

from __future__ import annotations

from mochi_lab.config import Settings
from mochi_lab.model import wait_workers_ready
from mochi_lab.pipelines.tokens import tokenizer_files
from mochi_lab.worker.loop import Worker


class ThreadPool:
    """The part of `mochi_lab.pool.driver.Pool` a `DirectBackend` uses, served by `n` Worker threads."""

    def __init__(self, settings: Settings, model: str = "tiny", n: int = 2) -> None:
        self.settings, self.model, self.n = settings, model, n
        self.workers: dict[str, Worker] = {}

    def ensure(self, n: int | None = None) -> list[str]:
        want = self.n if n is None else n
        for i in range(want):
            name = f"thread-worker-{i}"
            if name not in self.workers:
                self.workers[name] = Worker(name, self.settings, self.model)
                self.workers[name].start()
        return sorted(self.workers)

    def scale(self, n: int) -> None:
        self.n = n
        for name in sorted(self.workers)[n:]:
            self.workers.pop(name).stop(timeout=60)
        self.ensure()

    def shutdown(self) -> None:
        for worker in self.workers.values():
            worker._stop.set()  # all stop claiming at once, then each finishes its job
        for name in list(self.workers):
            self.workers.pop(name).stop(timeout=60)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """As the pool waits (`model.workers_ready`), over the threads' own states (one process: no pids)."""
        def rows() -> list[dict]:
            return [{"worker_id": w.worker_id, "state": w.state, "error": w.error} for w in self.workers.values()]

        wait_workers_ready(rows, timeout, every=0.05)

    def tokenizer_files(self, model: str, timeout: float = 5.0) -> dict[str, bytes] | None:
        return tokenizer_files(model, self.settings.cache_dir)
