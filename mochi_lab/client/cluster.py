"""`MochiCluster`: the one handle. It validates what enters and talks to one backend."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from mochi_lab.adapters import SUFFIX, AdapterRejected
from mochi_lab.client.backend import Backend
from mochi_lab.client.job import Job
from mochi_lab.config import ClientConfig, Settings
from mochi_lab.lora_refs import check_adapter_name
from mochi_lab.model import check_status
from mochi_lab.params import GenerationParams, ParamsError, SubmitOptions
from mochi_lab.pipelines.config import PipelineConfig

if TYPE_CHECKING:
    from mochi_lab.client.experiment import Experiment


class MochiCluster:
    """Connect to (or start) a cluster and re-attach to (or start) its warm pool.

    With no arguments: the local runtime (a Ray on 127.0.0.1 and its warm pool, started by the first
    handle and kept across kernels until idle, see mochi_lab.pool.runtime), SQLite in the user's data dir,
    the tiny model. `persistent=False` (or MOCHI_LAB_PERSISTENT=0) starts a Ray that dies with this process.
    `address`/`RAY_ADDRESS` joins a real Ray cluster; `redis_url`/`REDIS_URL` shares a Redis store
    (both: the direct backend, for operators). `backend=` plugs in any other `Backend`.

    In a notebook a start shows its steps in the cell as they go (the store, Ray and the pool, the workers
    loading their model, ready), each with its seconds; `progress=False` turns that off, `True` forces it.
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
        backend: Backend | None = None,
        persistent: bool | None = None,
        progress: bool | None = None,
    ):
        shown = None
        if backend is None:
            # An http(s) address, or no address with MOCHI_LAB_GATEWAY set: the multi-user gateway, which
            # decides the account from JUPYTERHUB_API_TOKEN (`account=` and JUPYTERHUB_USER change nothing).
            # An explicit redis_url or settings (operators) keeps the direct backend.
            gateway = address if isinstance(address, str) and address.startswith(("http://", "https://")) else (
                ClientConfig.from_env().gateway if address is None and redis_url is None and settings is None
                else None)
            if gateway:
                from mochi_lab.client.http import GatewayBackend

                backend = GatewayBackend(gateway, token=ClientConfig.from_env().token_text, model=model)
        if backend is None:
            from mochi_lab.extras import require

            # the thin install (`pip install mochi_lab`) talks to gateways only: say so before a deep ImportError
            require("MochiCluster() without a gateway (a pool on this machine, or a Ray cluster's)", "cpu", "ray",
                    "psutil", hint=", or talk to a gateway: MochiCluster('https://<gateway>/') or MOCHI_LAB_GATEWAY")
            from mochi_lab.client.direct import DirectBackend

            if settings is None:
                settings = Settings.from_env(ray_address=address, redis_url=redis_url, account=account,
                                             workers=workers, persistent=persistent)
            elif persistent is not None:
                settings = settings.model_copy(update={"persistent": persistent})
            shown = _start_progress(progress)
            try:
                backend = DirectBackend.start(settings, model, pipeline, start_pool=start_pool, progress=shown)
            except BaseException as exc:
                if shown is not None:
                    shown.failed(exc)  # the step that did not finish says so; the traceback follows
                raise
        self.backend = backend
        self.account = backend.account
        self.model = model
        if shown is not None:
            shown.follow(self.workers, model)  # the model loads in the workers: followed on the kernel's loop

    # -- jobs ------------------------------------------------------------------
    def generate(
        self,
        prompt: str | GenerationParams,
        *,
        priority: int = 0,
        tags: Iterable[str] = (),
        experiment: str | None = None,
        idempotency_key: str | None = None,
        force: bool = False,
        **params: Any,
    ) -> Job:
        """Validate `params` (GenerationParams fields) and queue one video. Returns at once.

        `prompt` may also be a `GenerationParams` (already validated). Result cache: identical params
        (model and seed included) give the existing done or in-flight job; failed and cancelled ones
        are not reused. `force=True` always queues a new job. `lora="name"` or `lora=[("a", 0.8), ("b", 0.3)]`
        applies this account's adapters (`adapters`) for this job only; the cache goes by their files' sha256.
        """
        if isinstance(prompt, GenerationParams):
            if params:
                raise ParamsError(f"pass either a GenerationParams or keyword params, not both: {sorted(params)}")
            p = prompt
        else:
            params.setdefault("model", self.model)
            p = GenerationParams.parse(prompt, **params)
        options = SubmitOptions.parse(priority=priority, tags=tags, experiment=experiment,
                                      idempotency_key=idempotency_key)
        return Job(self.backend, self.backend.submit(p, options, reuse=not force))

    def job(self, job_id: str) -> Job:
        """Re-attach to a job by id (JobNotFound for ids of other accounts)."""
        return Job(self.backend, self.backend.get(job_id))

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
        check_status(status)
        records = self.backend.list(status=status, experiment=experiment, tag=tag, text=text, limit=limit,
                                    offset=offset)
        return [Job(self.backend, r) for r in records]

    def delete(self, job_id: str) -> None:
        """Delete a job and its files."""
        self.backend.delete(job_id)

    def counts(self) -> dict[str, int]:
        """This account's jobs per status."""
        return self.backend.counts()

    def models(self) -> list[str]:
        """The model names this cluster serves."""
        return self.backend.models()

    @property
    def adapters(self) -> "Adapters":
        """This account's LoRA adapters: `upload(path, name=...)`, `list()`, `delete(name)`; a job applies them
        with `generate(..., lora="name")` or `lora=[("a", 0.8), ("b", 0.3)]`."""
        return Adapters(self.backend, self.model)

    # -- experiments -----------------------------------------------------------
    def experiment(
        self, name: str, *, description: str | None = None, tags: Iterable[str] | None = None, create: bool = True
    ) -> "Experiment":
        """Create, or re-open by name, one of this account's experiments (see mochi_lab.client.experiment)."""
        from mochi_lab.client.experiment import Experiment

        return Experiment.open(self.backend, name, description=description, tags=tags, model=self.model,
                               create=create)

    def experiments(self) -> list["Experiment"]:
        """This account's experiments, newest first."""
        from mochi_lab.client.experiment import Experiment

        return [Experiment(self.backend, r, model=self.model) for r in self.backend.list_experiments()]

    # -- pool ------------------------------------------------------------------
    def workers(self) -> "Rows":
        """One row per worker: id, node, GPU, memory, model, state, current job, jobs done, uptime."""
        now = time.time()
        return Rows(dict(r, uptime_s=round(now - r["started_at"], 1)) for r in self.backend.workers())

    def queue(self, limit: int = 50) -> "Rows":
        """The cluster's queued jobs, every account's, in the order workers will take them: `position`,
        `model`, size (`width`, `height`, `num_frames`, `steps`), `priority`, `created_at`, and `mine`.
        This account's rows carry `id` and `prompt`; other accounts' rows name their `account` and `id`
        only for admins."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 1000:
            raise ValueError(f"limit must be a whole number between 1 and 1000, got {limit!r}")
        return Rows(self.backend.queue(limit))

    def scale(self, n: int) -> None:
        """Grow or shrink the pool to `n` workers (shrinking lets running jobs finish)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a whole number of workers >= 0, got {n!r}")
        self.backend.scale(n)

    def dashboard_url(self) -> str | None:
        """The Ray dashboard's address when one answers from here (never through a gateway)."""
        return self.backend.dashboard_url()

    def shutdown_pool(self) -> None:
        """Stop every pool worker (queued jobs stay queued for the next pool)."""
        self.backend.shutdown_pool()

    def wait_ready(self, timeout: float = 300.0) -> "MochiCluster":
        """Block until every worker has its model loaded."""
        self.backend.wait_ready(timeout)
        return self

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "MochiCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        """The cluster at a glance, read now: live workers (ready, busy, loading), the queue, the dashboard."""
        from mochi_lab.display.reprs import cluster_html

        workers = queue = dashboard = error = None
        try:
            workers = list(self.workers())
            queue = list(self.queue(limit=1000))
            dashboard = self.dashboard_url()
        except Exception as exc:  # the handle still shows where it points
            error = f"cannot read the pool now: {type(exc).__name__}: {exc}"
        return cluster_html(self.backend.info(), workers=workers, queue=queue, dashboard=dashboard, error=error)

    def __repr__(self) -> str:
        i = self.backend.info()
        store = f" store={i['store']}" if i.get("store") else ""
        return f"<MochiCluster {i['backend']} address={i['address']}{store} account={self.account!r} model={self.model!r}>"


def _start_progress(progress: bool | None):
    """The start's steps shown in the cell (`mochi_lab.display.startup`): by default in a Jupyter kernel only."""
    if progress is False:
        return None
    from mochi_lab.display.startup import StartProgress, in_kernel

    return StartProgress() if progress or in_kernel() else None


class Adapters:
    """An account's LoRA adapters, through its backend: `cluster.adapters` (`MochiCluster.adapters`). An upload is
    checked before anything is kept (`AdapterRejected` says why; `RecordTooLarge` over the size cap,
    `QuotaExceeded` over the count); a name the account does not have is `AdapterNotFound`."""

    def __init__(self, backend: Backend, model: str):
        self.backend, self.model = backend, model

    def upload(self, path: str | os.PathLike, name: str | None = None, *, model: str | None = None) -> dict[str, Any]:
        """Check the `.safetensors` LoRA at `path` against `model`'s transformer (default: the cluster's) and keep
        it as `name` (default: the file's stem), replacing one of that name; its record. AdapterRejected names
        why a file is refused (RecordTooLarge over the size cap); nothing is kept then."""
        path = Path(path)
        if path.suffix != SUFFIX:
            raise AdapterRejected(f"{path.name}: only {SUFFIX} adapters are accepted (pickled .bin or .pt weights "
                                  "can run code when loaded; safetensors.torch.save_file writes one)")
        name = path.stem if name is None else name
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise AdapterRejected(str(exc)) from None
        with path.open("rb") as f:
            return self.backend.put_adapter(name, f, model=model or self.model)

    def list(self) -> "Rows":
        """The account's adapters by name: name, sha256, bytes, model, rank, modules, dtypes, created_at."""
        return Rows(self.backend.adapters())

    def delete(self, name: str) -> None:
        """Forget an adapter (AdapterNotFound when there is none). Jobs queued with it still run with it: its file
        stays until they end."""
        self.backend.delete_adapter(name)

    def __repr__(self) -> str:
        return f"<Adapters of {self.backend.account!r}: {', '.join(r['name'] for r in self.list()) or 'none'}>"


class Rows(list):
    """A list of dicts (workers, queued jobs) that also converts to a DataFrame."""

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(list(self))
