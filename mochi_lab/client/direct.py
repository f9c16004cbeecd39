"""The direct backend: the store plus the Ray pool, in this process.

Used by the embedded default (no address: local Ray, SQLite) and by operators (`RAY_ADDRESS`,
`REDIS_URL`). Whoever holds it holds the store's credentials, so the account it acts for is the one
in its settings; on a shared cluster only the gateway holds one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import httpx

from mochi_lab.adapters import AdapterStore
from mochi_lab.client.backend import ARTIFACTS, Backend, queue_rows, worker_rows
from mochi_lab.config import ScalingConfig, Settings, check_account, known_models, redact_url
from mochi_lab.model import (
    DONE,
    QUEUED,
    RUNNING,
    JobRecord,
    RecordTooLarge,
    StoreError,
    StoreUnavailable,
    artifact_path,
)
from mochi_lab.params import (
    MAX_PROMPT_TOKENS,
    GenerationParams,
    SubmitOptions,
    check_admission,
    check_model,
    check_prompt_tokens,
)
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.store import Store, open_store
from mochi_lab.store.cache import cached_enqueue

if TYPE_CHECKING:
    from mochi_lab.pool.controller import PoolController
    from mochi_lab.pool.driver import Pool
    from mochi_lab.pool.metrics import Metrics

# the stage a queued job shows while no worker is alive to take it (the pool is scaling up from zero)
WAITING_STAGE = "waiting for a worker"


class DirectBackend(Backend):
    """One account's view of a store, and (optionally) the pool that serves it.

    `max_active_jobs`: the account's quota of queued + running jobs (None: none), enforced by the store;
    `max_experiments` and `max_experiment_bytes` bound its experiment records (None: no bound).
    `admin`: whether the queue and the workers show other accounts' job ids and names, and the workers
    their nodes, pids and memory (whoever holds the store's credentials can read them anyway; the gateway
    passes its caller's role).
    The pool's owner may hold a `controller` (autoscaling) and `metrics` (a Prometheus endpoint)."""

    controller: "PoolController | None" = None
    metrics: "Metrics | None" = None

    def __init__(self, settings: Settings, store: Store, pool: "Pool | None" = None, *, model: str = "tiny",
                 ray_address: str | None = None, max_active_jobs: int | None = None, admin: bool = True,
                 max_experiments: int | None = None, max_experiment_bytes: int | None = None):
        self.settings = settings
        self.account = settings.account
        self.store = store
        self.pool = pool
        self.model = model
        self.ray_address = ray_address
        self.max_active_jobs = max_active_jobs
        self.max_experiments, self.max_experiment_bytes = max_experiments, max_experiment_bytes
        self.admin = admin
        # [(monotonic time, any live worker row then)]: one slot, shared with for_account's backends
        self._workers_seen: list[tuple[float, bool]] = [(-1e9, False)]

    @classmethod
    def start(cls, settings: Settings, model: str = "tiny", pipeline: PipelineConfig | None = None, *,
              start_pool: bool = True, scaling: ScalingConfig | None = None,
              progress: Callable[[str, str], None] | None = None) -> "DirectBackend":
        """Open the store (failing fast when it is unreachable), join or start Ray, re-attach the pool.

        With `scaling`, a `PoolController` sizes the pool from the queue (and `start_pool` is moot); with
        `settings.metrics_port` set, Prometheus metrics are served on it. `progress(step, detail)` is told
        each step as it begins ("store", "runtime", "ray" or "join", "pool"; see mochi_lab.display.startup)."""
        check_model(model, known_models())
        step = progress or (lambda _step, _detail: None)
        step("store", redact_url(settings.store_url))
        store = open_store(settings.store_url, max_attempts=settings.max_attempts)
        try:
            store.counts(settings.account)  # one round trip now beats a worker retrying forever later
        except StoreError as exc:
            store.close()
            raise StoreUnavailable(f"cannot use the store at {redact_url(settings.store_url)}: {exc}") from None
        from mochi_lab.pool.connection import connect
        from mochi_lab.pool.driver import Pool

        pipeline = pipeline or PipelineConfig(cpu_offload=settings.offload)
        if settings.ray_address is None and settings.persistent:
            from mochi_lab.pool import runtime

            step("runtime", str(settings.data_dir))
            try:  # the local runtime that outlives this process: join it, or start it
                settings = runtime.attach(settings, model, pipeline)
            except BaseException:
                store.close()
                raise
        if settings.ray_address:
            step("join", settings.ray_address)
        elif not settings.persistent:
            step("ray", "on 127.0.0.1, for this process")
        address = connect(settings)
        step("pool", f"model {model}")
        pool = Pool(settings, store, model, pipeline)
        backend = cls(settings, store, pool, model=model, ray_address=address)
        if scaling is not None:
            from mochi_lab.pool.controller import PoolController

            backend.controller = PoolController(pool, store, scaling)
            backend.controller.start()
        elif start_pool:
            pool.ensure()
        if settings.metrics_port is not None:
            from mochi_lab.pool.metrics import Metrics

            backend.metrics = Metrics(store, backend.controller, accounts=settings.metrics_accounts)
            backend.metrics.serve(settings.metrics_port, settings.metrics_host)
        return backend

    def for_account(self, account: str, *, admin: bool = False, max_active_jobs: int | None = None,
                    max_experiments: int | None = None, max_experiment_bytes: int | None = None) -> "DirectBackend":
        """This backend's store, pool and controller, bound to `account` (the gateway's per-request
        backend); the workers' presence is read once a second for all of them, not per request."""
        check_account(account)  # model_copy does not validate
        other = DirectBackend(self.settings.model_copy(update={"account": account}), self.store, self.pool,
                              model=self.model, ray_address=self.ray_address, max_active_jobs=max_active_jobs,
                              admin=admin, max_experiments=max_experiments, max_experiment_bytes=max_experiment_bytes)
        other.controller = self.controller  # an admin's scale sets its bounds
        other._workers_seen = self._workers_seen
        return other

    # -- jobs ------------------------------------------------------------------
    def _token_counter(self, params: GenerationParams) -> Callable[[str], int] | None:
        """Counts `params.model`'s tokens here: with its tokenizer on this machine, else with the one a worker
        sent once (a gateway has no model files); None when neither is at hand (the worker checks at claim)."""
        if max(len(params.prompt), len(params.negative_prompt)) < MAX_PROMPT_TOKENS:  # a token is >= 1 character
            return None
        from mochi_lab.pipelines.tokens import keep_tokenizer_files, local_tokenizer

        tokenizer = local_tokenizer(params.model, self.settings.cache_dir)
        if tokenizer is None and self.pool is not None:
            files = self.pool.tokenizer_files(params.model)
            if files:
                tokenizer = keep_tokenizer_files(params.model, self.settings.cache_dir, files)
        return None if tokenizer is None else (lambda text: len(tokenizer(text).input_ids))

    def submit(self, params: GenerationParams, options: SubmitOptions, *, reuse: bool = True) -> JobRecord:
        check_model(params.model, known_models())
        check_admission(params, self.settings.max_token_steps.get(params.model))
        if params.lora:  # by the files' sha256: the result cache and the worker go by content, not by name
            params = params.with_adapters(self.adapter_store().resolve(params.lora, params.model))
        counter = self._token_counter(params)
        if counter is not None:
            check_prompt_tokens(params, counter)
        opts = {"priority": options.priority, "experiment": options.experiment, "tags": list(options.tags),
                "max_active": self.max_active_jobs}
        if reuse and options.idempotency_key is None:
            return cached_enqueue(self.store, self.account, params.to_dict(), **opts)
        return self.store.enqueue(self.account, params.to_dict(), idempotency_key=options.idempotency_key, **opts)

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get(self.account, job_id)
        if record.status == QUEUED and self.pool is not None and not self._any_worker():
            record = dataclasses.replace(record, stage=WAITING_STAGE)
        return record

    def _any_worker(self) -> bool:
        """Whether any worker row is live, read at most once a second (watches poll a queued job often)."""
        now = time.monotonic()
        seen_at, any_worker = self._workers_seen[0]
        if now - seen_at > 1.0:
            any_worker = bool(self.store.workers())
            self._workers_seen[0] = (now, any_worker)
        return any_worker

    def list(self, *, status: str | None = None, experiment: str | None = None, tag: str | None = None,
             text: str | None = None, limit: int = 50, offset: int = 0) -> list[JobRecord]:
        return self.store.list(self.account, status=status, experiment=experiment, tag=tag, text=text,
                               limit=limit, offset=offset)

    def cancel(self, job_id: str) -> JobRecord:
        return self.store.cancel(self.account, job_id)

    def delete(self, job_id: str) -> None:
        self.store.delete(self.account, job_id)

    def counts(self) -> dict[str, int]:
        return self.store.counts(self.account)

    def preview(self, job_id: str) -> tuple[int, bytes] | None:
        return self.store.get_preview(self.account, job_id)

    def queue(self, limit: int = 50) -> list[dict[str, Any]]:
        return queue_rows(self.store.queued(limit), self.account, admin=self.admin)

    # -- artifacts -------------------------------------------------------------
    def artifact_path(self, job_id: str, name: str) -> Path:
        if name not in ARTIFACTS:
            raise ValueError(f"artifact must be one of {', '.join(ARTIFACTS)}, got {name!r}")
        record = self.get(job_id)  # JobNotFound for other accounts' ids
        if record.status != DONE or name not in record.artifacts:
            raise FileNotFoundError(f"job {job_id} has no {name} (status {record.status})")
        # Derived from the account and the id inside the artifacts root, never read from the store.
        path = artifact_path(self.settings.artifacts_dir, self.account, job_id, name)
        if not path.is_file():
            raise FileNotFoundError(f"the {name} of job {job_id} is gone from {path.parent}")
        return path

    # -- LoRA adapters ---------------------------------------------------------
    def adapter_store(self) -> AdapterStore:
        """This account's adapters, beside its videos, with this cluster's caps."""
        s = self.settings
        return AdapterStore(s.artifacts_dir, self.account, max_bytes=s.max_adapter_bytes,
                            max_rank=s.max_adapter_rank, max_count=s.max_adapters, cache_dir=s.cache_dir,
                            in_use=self._adapters_in_use)

    def _adapters_in_use(self) -> set[str]:
        """The sha256 of every adapter the account's queued and running jobs name: their files stay until those
        jobs end (a running job's retry may load it again on another worker)."""
        counts = self.store.counts(self.account)
        out: set[str] = set()
        for status in (QUEUED, RUNNING):
            if not counts.get(status):
                continue
            for record in self.store.list(self.account, status=status, limit=counts[status]):
                lora = record.params.get("lora") if isinstance(record.params, dict) else None
                out.update(ref["sha256"] for ref in lora or () if isinstance(ref, dict) and ref.get("sha256"))
        return out

    def put_adapter(self, name: str, data: IO[bytes], *, model: str | None = None) -> dict[str, Any]:
        return self.adapter_store().put(name, data, model=model or self.model)

    def adapters(self) -> list[dict[str, Any]]:
        return self.adapter_store().list()

    def delete_adapter(self, name: str) -> None:
        self.adapter_store().delete(name)

    # -- the pool --------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted(known_models())

    def workers(self) -> list[dict[str, Any]]:
        return worker_rows(self.store.workers(), self.account, admin=self.admin)

    def _pool(self) -> "Pool":
        if self.pool is None:
            raise RuntimeError("this handle has no pool (it was opened on the store alone)")
        return self.pool

    def scale(self, n: int) -> None:
        """n workers: with a controller, its min and max both become n (it retires only idle workers)."""
        if self.controller is not None:
            self.controller.set_bounds(n, n)
        else:
            self._pool().scale(n)

    def shutdown_pool(self) -> None:
        if self.controller is not None:  # or it would start them again
            self.controller.set_bounds(0, 0)
        self._pool().shutdown()

    def wait_ready(self, timeout: float) -> None:
        self._pool().wait_ready(timeout)

    def dashboard_url(self) -> str | None:
        """settings.ray_dashboard_url, else the dashboard Ray reports, if it answers within a second."""
        url = self.settings.ray_dashboard_url
        if not url and self.pool is not None:
            try:
                import ray

                url = ray._private.worker.get_dashboard_url()
            except Exception:  # no dashboard, or a Ray without this private helper
                url = None
        if not url:
            return None
        url = url if "://" in url else f"http://{url}"
        try:
            httpx.get(url, timeout=1.0)
        except httpx.HTTPError:
            return None
        return url

    # -- experiments -----------------------------------------------------------
    def get_experiment(self, name: str) -> dict[str, Any]:
        return self.store.get_experiment(self.account, name)

    def put_experiment(self, record: dict[str, Any]) -> None:
        if self.max_experiment_bytes is not None:
            size = len(json.dumps(record, separators=(",", ":")))
            if size > self.max_experiment_bytes:
                raise RecordTooLarge(f"experiment {record.get('name')!r} would be {size} bytes as JSON; the limit is "
                                     f"max_experiment_bytes={self.max_experiment_bytes}; nothing was changed")
        self.store.put_experiment(self.account, record, max_count=self.max_experiments)

    def list_experiments(self) -> list[dict[str, Any]]:
        return self.store.list_experiments(self.account)

    # -- the handle ------------------------------------------------------------
    def info(self) -> dict[str, str]:
        s = self.settings
        return {
            "backend": "direct",
            "address": str(self.ray_address or "-"),
            "store": redact_url(s.store_url),
            "account": self.account,
            "model": self.model,
            "workers": (f"one per {'GPU' if s.gpus_per_worker == 1 else f'{s.gpus_per_worker} GPUs'} (one on a "
                        f"CPU-only cluster)") if s.workers is None else str(s.workers),
        }

    def close(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()


__all__ = ["DirectBackend"]
