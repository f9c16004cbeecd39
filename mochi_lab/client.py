"""`MochiCluster`: the one handle. It writes jobs to the store and keeps the warm pool running."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from mochi_lab.job import Job
from mochi_lab.params import GenerationParams
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.settings import Settings
from mochi_lab.store import STATUSES, open_store

if TYPE_CHECKING:
    from mochi_lab.experiment import Experiment


class MochiCluster:
    """Connect to (or start) a Ray cluster and a store, and re-attach to (or start) the warm pool.

    With no arguments: a local Ray on 127.0.0.1, SQLite in the user's data dir, the tiny model.
    `address`/`RAY_ADDRESS` joins a real cluster; `redis_url`/`REDIS_URL` shares a Redis store.
    """

    def __init__(
        self,
        address: str | None = None,
        redis_url: str | None = None,
        account: str | None = None,
        model: str = "tiny",
        workers: int | None = None,
        *,
        pipeline: PipelineConfig | None = None,
        settings: Settings | None = None,
        start_pool: bool = True,
    ):
        from mochi_lab.pool import Pool, connect

        self.settings = settings or Settings.from_env(
            ray_address=address, redis_url=redis_url, account=account, workers=workers
        )
        GenerationParams.parse("model check", model=model)  # rejects unknown models early
        self.account = self.settings.account
        self.model = model
        self.store = open_store(self.settings.store_url, max_attempts=self.settings.max_attempts)
        self.ray_address = connect(self.settings)
        self.pool = Pool(self.settings, self.store, model, pipeline or PipelineConfig(cpu_offload=self.settings.offload))
        if start_pool:
            self.pool.ensure()

    # -- jobs ------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        priority: int = 0,
        tags: Iterable[str] = (),
        experiment: str | None = None,
        idempotency_key: str | None = None,
        force: bool = False,
        **params: Any,
    ) -> Job:
        """Validate `params` (GenerationParams fields) and queue one video. Returns at once.

        Result cache: identical params (model and seed included) give the existing done or in-flight
        job; failed and cancelled ones are not reused. `force=True` always queues a new job.
        """
        params.setdefault("model", self.model)
        p = GenerationParams.parse(prompt, **params)
        if idempotency_key is None and not force:
            from mochi_lab.cache import cached_enqueue

            record = cached_enqueue(self.store, self.account, p.to_dict(), priority=priority,
                                    experiment=experiment, tags=tags)
            return Job(self.store, self.account, record)
        record = self.store.enqueue(
            self.account, p.to_dict(), priority=priority, experiment=experiment, tags=tags,
            idempotency_key=idempotency_key,
        )
        return Job(self.store, self.account, record)

    def job(self, job_id: str) -> Job:
        """Re-attach to a job by id (JobNotFound for ids of other accounts)."""
        return Job(self.store, self.account, self.store.get(self.account, job_id))

    def jobs(
        self,
        status: str | None = None,
        experiment: str | None = None,
        text: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """This account's jobs, newest first."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        records = self.store.list(
            self.account, status=status, experiment=experiment, tag=tag, text=text, limit=limit, offset=offset
        )
        return [Job(self.store, self.account, r) for r in records]

    def delete(self, job_id: str) -> None:
        """Delete a job and its files."""
        self.store.delete(self.account, job_id)

    def counts(self) -> dict[str, int]:
        return self.store.counts(self.account)

    # -- experiments -----------------------------------------------------------
    def experiment(
        self, name: str, *, description: str | None = None, tags: Iterable[str] | None = None, create: bool = True
    ) -> "Experiment":
        """Create, or re-open by name, one of this account's experiments (see mochi_lab.experiment)."""
        from mochi_lab.experiment import Experiment

        return Experiment.open(self.store, self.account, name, description=description, tags=tags,
                               model=self.model, create=create)

    def experiments(self) -> list["Experiment"]:
        """This account's experiments, newest first."""
        from mochi_lab.experiment import Experiment

        return [Experiment(self.store, self.account, r, model=self.model) for r in self.store.list_experiments(self.account)]

    # -- pool ------------------------------------------------------------------
    def workers(self) -> "WorkerRows":
        """One row per worker: id, node, GPU, memory, model, state, current job, jobs done, uptime."""
        import time

        now = time.time()
        rows = [dict(r, uptime_s=round(now - r["started_at"], 1)) for r in self.store.workers()]
        return WorkerRows(rows)

    def scale(self, n: int) -> None:
        """Grow or shrink the pool to `n` workers (shrinking lets running jobs finish)."""
        self.pool.scale(n)

    def shutdown_pool(self) -> None:
        """Stop every pool worker (queued jobs stay queued for the next pool)."""
        self.pool.shutdown()

    def wait_ready(self, timeout: float = 300.0) -> "MochiCluster":
        """Block until every worker has its model loaded."""
        self.pool.wait_ready(timeout)
        return self

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "MochiCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        from mochi_lab.reprs import cluster_html

        return cluster_html(self)

    def __repr__(self) -> str:
        backend = "redis" if self.settings.redis_url else "sqlite"
        return f"<MochiCluster ray={self.ray_address} store={backend} account={self.account!r} model={self.model!r}>"


class WorkerRows(list):
    """A list of worker dicts that also converts to a DataFrame."""

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(list(self))
