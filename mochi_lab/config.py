"""Typed settings, in one place: the only module that reads the process environment (or sets it, for Ray).

One config per consumer; each field names the environment variable it reads beside it (`Env`), and
`from_env(**overrides)` reads them all (an empty variable counts as unset; an override that is not None wins):

- `StoreConfig`: where jobs and artifacts live.
- `WorkerConfig`: a worker's loop (a StoreConfig: a worker talks to the store itself).
- `PoolConfig`: the pool's owner: Ray, the workers it starts, the local runtime, admission, metrics (a
  WorkerConfig: it hands each worker its part).
- `Settings`: what a handle, the CLI and the gateway start from: a PoolConfig, plus the account and the
  pipeline's offload.
- `ClientConfig`: a notebook's own: which gateway, its token, where downloads go.
- `GatewayConfig` and `ScalingConfig`: the gateway's and the pool controller's.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

BUILTIN_MODELS: dict[str, str] = {
    "tiny": "tiny",  # built offline in code, see mochi_lab.pipelines.tiny
    "mochi-1-preview": "genmo/mochi-1-preview",
}


def known_models() -> dict[str, str]:
    """Model name -> hub id or local checkpoint dir. `MOCHI_LAB_MODELS` (a JSON object) adds more,
    e.g. fine-tuned checkpoints; it must be set alike for clients and workers."""
    extra = os.environ.get("MOCHI_LAB_MODELS")
    if not extra:
        return dict(BUILTIN_MODELS)
    try:
        models = json.loads(extra)
        assert isinstance(models, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"MOCHI_LAB_MODELS must be a JSON object of name -> checkpoint, got {extra!r}") from None
    return {**BUILTIN_MODELS, **models}


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mochi_lab"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mochi_lab"


def default_account() -> str:
    return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()


# An account names a folder under the artifacts root: no separators, no leading dot.
ACCOUNT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def check_account(account: str) -> str:
    if not isinstance(account, str) or not ACCOUNT_RE.fullmatch(account):
        raise ValueError(f"account must be 1-64 letters, digits, '.', '_', '@', '+' or '-', starting with a "
                         f"letter or digit; got {account!r:.80}")
    return account


def redact_url(url: str) -> str:
    """A store URL fit for reprs, logs and errors: the password (and user) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[-1]))


def without_credentials(url: str | None) -> str | None:
    """The URL with no user or password at all: for a URL passed on to processes that hold their own
    credentials (a worker's store URL), or that needs none (a gateway's: the token authenticates)."""
    if not url:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def redis_url_from_env() -> str | None:
    """REDIS_URL wins; else the seed's REDIS_HOST/REDIS_PORT/REDIS_DB; else None (SQLite)."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    host = os.environ.get("REDIS_HOST")
    if not host:
        return None
    return f"redis://{host}:{os.environ.get('REDIS_PORT', '6379')}/{os.environ.get('REDIS_DB', '0')}"


# -- this process's environment, beyond the configs ---------------------------------------------------
def node_redis_url() -> str | None:
    """This node's own REDIS_URL (on a cluster, a worker's least-privilege user), or None."""
    return os.environ.get("REDIS_URL") or None


def cuda_device_index() -> int:
    """The device index CUDA_VISIBLE_DEVICES gives this process first (0 when unset); ValueError when
    it names devices by UUID."""
    return int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])


def ray_auth_disabled() -> bool:
    """Whether RAY_AUTH_MODE turns Ray's token auth off for this process."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"


def set_ray_env(**values: str | None) -> None:
    """Set (None: remove) variables that Ray reads in this process and that its child processes inherit."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def default_ray_env(**values: str) -> None:
    """Set the variables Ray reads that the user has not set."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


def child_env(first_on_path: Path) -> dict[str, str]:
    """This process's environment for a child Python process that must import the package under
    `first_on_path` (the local runtime's daemon imports the same mochi_lab as the kernel that starts it)."""
    path = os.pathsep.join(p for p in (str(first_on_path), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


# -- the configs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Env:
    """The environment variable a config field reads in `from_env` (`Annotated[type, Env("NAME")]`)."""

    name: str


_C = TypeVar("_C", bound="EnvConfig")


class EnvConfig(BaseModel):
    """A config whose fields may name their environment variable (`Env`)."""

    @classmethod
    def env_vars(cls) -> dict[str, str]:
        """Field -> the environment variable it reads."""
        return {name: meta.name for name, info in cls.model_fields.items()
                for meta in info.metadata if isinstance(meta, Env)}

    @classmethod
    def environment(cls) -> dict[str, Any]:
        """The fields this process's environment sets, as text (the fields' validators parse it)."""
        return {name: os.environ[var] for name, var in cls.env_vars().items() if os.environ.get(var)}

    @classmethod
    def from_env(cls: type[_C], **overrides: Any) -> _C:
        """The environment's values; keyword overrides that are not None win."""
        values = cls.environment()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _json_text(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v  # the environment's JSON


class StoreConfig(EnvConfig):
    """Where jobs and artifacts live: Redis when `redis_url` is set (REDIS_URL, else REDIS_HOST, REDIS_PORT
    and REDIS_DB), else SQLite under `data_dir`; artifacts under `data_dir` either way."""

    redis_url: str | None = None
    data_dir: Annotated[Path, Env("MOCHI_LAB_DATA_DIR")] = Field(default_factory=_data_home)
    max_attempts: int = 3

    @classmethod
    def environment(cls) -> dict[str, Any]:
        values = super().environment()
        if url := redis_url_from_env():
            values["redis_url"] = url
        return values

    @property
    def store_url(self) -> str:
        return self.redis_url or f"sqlite:///{self.data_dir / 'store.sqlite3'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


class WorkerConfig(StoreConfig):
    """One worker's loop (mochi_lab.worker.loop): leases, polling, its bounds and live previews."""

    cache_dir: Annotated[Path, Env("MOCHI_LAB_CACHE_DIR")] = Field(default_factory=_cache_home)
    lease_s: Annotated[float, Env("MOCHI_LAB_LEASE_S")] = 30.0
    # An idle worker looks for work every poll_s; idle_after_s after its last job, it backs off,
    # doubling the interval up to idle_poll_s.
    poll_s: float = 0.05
    idle_after_s: float = 10.0
    idle_poll_s: float = 0.5
    worker_ttl_s: float = 15.0
    # Reliability: a worker backs off at most this long between store retries during an outage;
    # its loop counts as wedged after worker_stall_s without progress (loading a model excepted);
    # a running job that ignores a cancel for cancel_grace_s, or runs past max_run_s, gets its worker
    # restarted (the job is cancelled or failed, not retried); the actor's watchdog looks every health_check_s.
    store_backoff_max_s: float = 2.0
    worker_stall_s: float = 900.0
    cancel_grace_s: Annotated[float, Env("MOCHI_LAB_CANCEL_GRACE_S")] = 30.0
    max_run_s: Annotated[float, Env("MOCHI_LAB_MAX_RUN_S")] = 3600.0
    health_check_s: float = 1.0
    # Live previews: every preview_every denoising steps (0: about every 10 % of them; -1: none), at most
    # one per preview_min_interval_s.
    preview_every: Annotated[int, Env("MOCHI_LAB_PREVIEW_EVERY")] = 0
    preview_min_interval_s: Annotated[float, Env("MOCHI_LAB_PREVIEW_MIN_INTERVAL_S")] = 1.0
    # Tests only (mochi_lab.worker.gate): a folder of hold files that stop jobs at a chosen stage or step.
    test_gates: Annotated[Path | None, Env("MOCHI_LAB_TEST_GATES")] = None
    # LoRA adapters (mochi_lab.adapters): the largest file and rank an upload may have (checked again when a
    # worker loads one), how many adapters an account may keep, and how many a worker keeps loaded beside
    # its model (the least recently used one goes first).
    max_adapter_bytes: Annotated[int, Env("MOCHI_LAB_MAX_ADAPTER_BYTES")] = Field(default=512 * 2**20, ge=1024)
    max_adapter_rank: Annotated[int, Env("MOCHI_LAB_MAX_ADAPTER_RANK")] = Field(default=256, ge=1)
    max_adapters: Annotated[int, Env("MOCHI_LAB_MAX_ADAPTERS")] = Field(default=100, ge=1)
    lora_cache: Annotated[int, Env("MOCHI_LAB_LORA_CACHE")] = Field(default=4, ge=1, le=64)


class PoolConfig(WorkerConfig):
    """The pool's owner (mochi_lab.pool): the Ray it joins or starts, the workers' shape, the local
    runtime's lifetime, admission and the owner's metrics. Each worker gets the WorkerConfig part."""

    ray_address: Annotated[str | None, Env("RAY_ADDRESS")] = None
    namespace: Annotated[str, Env("MOCHI_LAB_NAMESPACE")] = "mochi_lab"
    # None: one per GPU, or one on a CPU-only cluster
    workers: Annotated[int | None, Env("MOCHI_LAB_WORKERS")] = None
    cpus_per_worker: Annotated[int, Env("MOCHI_LAB_CPUS_PER_WORKER")] = 1
    # GPUs per worker: 1 is one single-GPU worker per GPU; 2, 4 or 8 make each worker a gang of that many
    # ranks that runs one video on all its GPUs (mochi_lab.pool.gang; 2 is the production shape). gang_timeout_s
    # bounds how long one rank of a gang waits for the others (forming the gang, a collective, a model switch).
    gpus_per_worker: Annotated[Literal[1, 2, 4, 8], Env("MOCHI_LAB_GPUS_PER_WORKER")] = 1
    gang_timeout_s: Annotated[float, Env("MOCHI_LAB_GANG_TIMEOUT_S")] = 600.0
    # whether workers ask Ray for GPUs; None: when the cluster has GPUs now. A pool that scales from zero
    # sets it: its workers must ask for a GPU while no GPU node exists yet.
    gpu_workers: Annotated[bool | None, Env("MOCHI_LAB_GPU_WORKERS")] = None
    # extra Ray resources each worker needs, e.g. {"h100": 1} to pin the pool to a node group
    worker_resources: dict[str, float] = Field(default_factory=dict)
    # With no ray_address: True attaches to (or starts) the local runtime that outlives kernels
    # (mochi_lab.pool.runtime); False starts a Ray inside this process that dies with it.
    persistent: Annotated[bool, Env("MOCHI_LAB_PERSISTENT")] = True
    # The local runtime stops itself after this long with no attached handle and no busy worker; and,
    # with no attached handle, after its store has been unreachable this long (or runtime_idle_s if shorter).
    runtime_idle_s: Annotated[float, Env("MOCHI_LAB_RUNTIME_IDLE_S")] = 1800.0
    runtime_store_gone_s: Annotated[float, Env("MOCHI_LAB_RUNTIME_STORE_GONE_S")] = Field(default=300.0, gt=0)
    # Admission: the largest job (latent tokens x steps) each model's pool accepts; None: no limit.
    # The defaults fit one job in well under an hour: the tiny model on a CPU, Genmo's reference
    # video (163 frames, 848x480, 64 steps = 2.85M) on an H100. Pool owners set their own
    # (in the environment as JSON, e.g. {"mochi-1-preview": 6000000}).
    max_token_steps: Annotated[dict[str, int | None], Env("MOCHI_LAB_MAX_TOKEN_STEPS")] = Field(
        default_factory=lambda: {"tiny": 1_000_000, "mochi-1-preview": 3_000_000})
    # Prometheus metrics of the pool owner (mochi_lab.pool.metrics: the gateway, or the embedded default when
    # set) on their own port, on metrics_host (0: a free port; None: off). Accounts become a label of
    # the queue gauge only with metrics_accounts (their number is the number of users).
    metrics_port: Annotated[int | None, Env("MOCHI_LAB_METRICS_PORT")] = None
    metrics_host: Annotated[str, Env("MOCHI_LAB_METRICS_HOST")] = "127.0.0.1"
    metrics_accounts: Annotated[bool, Env("MOCHI_LAB_METRICS_ACCOUNTS")] = False
    # the Ray dashboard the ClusterPanel links to; None: the one Ray reports, when it answers
    ray_dashboard_url: Annotated[str | None, Env("MOCHI_LAB_RAY_DASHBOARD_URL")] = None

    @field_validator("gpus_per_worker", mode="before")
    @classmethod
    def _gpus_from_text(cls, v: Any) -> Any:
        return int(v) if isinstance(v, str) and v.strip().isdigit() else v  # the environment's "2"

    @field_validator("max_token_steps", mode="before")
    @classmethod
    def _limits_from_text(cls, v: Any) -> Any:
        return _json_text(v)


class Settings(PoolConfig):
    """What a handle, the CLI and the gateway start from: the pool's owner's config, plus whose jobs
    these are and the pipeline's offload. `Settings.from_env()` reads the environment."""

    account: str = Field(default_factory=default_account)
    offload: Annotated[bool, Env("MOCHI_LAB_OFFLOAD")] = False  # model CPU offload, for GPUs under ~48 GB

    @field_validator("account")
    @classmethod
    def _account(cls, v: str) -> str:
        return check_account(v)


class ClientConfig(EnvConfig):
    """A notebook's or script's own: the gateway a handle with no address uses (and the token it shows
    the gateway), where downloaded artifacts are cached, and where a displayed job's video is copied for
    its link (relative to the kernel's folder, which JupyterLab sets to the notebook's)."""

    gateway: Annotated[str | None, Env("MOCHI_LAB_GATEWAY")] = None
    token: Annotated[SecretStr | None, Env("JUPYTERHUB_API_TOKEN")] = None
    cache_dir: Annotated[Path, Env("MOCHI_LAB_CACHE_DIR")] = Field(default_factory=_cache_home)
    download_dir: Annotated[Path, Env("MOCHI_LAB_DOWNLOAD_DIR")] = Path("mochi_videos")

    @property
    def token_text(self) -> str | None:
        return self.token.get_secret_value() if self.token is not None else None


class ScalingConfig(EnvConfig):
    """The pool controller's settings (mochi_lab.pool.controller), from its owner's configuration.

    Every `interval_s` the pool is sized to clamp(ceil((queued + running jobs) / target_per_worker),
    min_workers, max_workers). Growing is immediate; a worker is retired only once it has been idle for
    `idle_timeout_s`, and at most once per `cooldown_s` (no flapping). `headroom_workers` > 0 asks the
    Ray autoscaler (request_resources) to keep room for that many workers more than the pool has."""

    model_config = ConfigDict(extra="forbid")

    min_workers: Annotated[int, Env("MOCHI_LAB_MIN_WORKERS")] = Field(default=0, ge=0, le=1024)
    max_workers: Annotated[int, Env("MOCHI_LAB_MAX_WORKERS")] = Field(default=4, ge=0, le=1024)
    target_per_worker: Annotated[int, Env("MOCHI_LAB_TARGET_PER_WORKER")] = Field(default=1, ge=1, le=1000)
    idle_timeout_s: Annotated[float, Env("MOCHI_LAB_IDLE_TIMEOUT_S")] = Field(default=300.0, ge=0)
    cooldown_s: Annotated[float, Env("MOCHI_LAB_SCALE_COOLDOWN_S")] = Field(default=60.0, ge=0)
    interval_s: Annotated[float, Env("MOCHI_LAB_SCALE_INTERVAL_S")] = Field(default=2.0, gt=0, le=60)
    headroom_workers: Annotated[int, Env("MOCHI_LAB_HEADROOM_WORKERS")] = Field(default=0, ge=0, le=1024)

    @field_validator("max_workers")
    @classmethod
    def _bounds(cls, v: int, info: Any) -> int:
        low = info.data.get("min_workers")
        if low is not None and v < low:
            raise ValueError(f"max_workers ({v}) must be at least min_workers ({low})")
        return v


class GatewayConfig(EnvConfig):
    """The gateway's own settings (the store, Ray and pool ones are `Settings`). `from_env` reads each
    field's variable, and JUPYTERHUB_HOST with JUPYTERHUB_BASE_URL for `public_hub_url`; keyword overrides
    win."""

    model_config = ConfigDict(extra="forbid")

    host: Annotated[str, Env("MOCHI_LAB_GATEWAY_HOST")] = "127.0.0.1"
    port: Annotated[int, Env("MOCHI_LAB_GATEWAY_PORT")] = 8770
    # the model of the pool the gateway owns (it creates or re-attaches it at start)
    model: Annotated[str, Env("MOCHI_LAB_MODEL")] = "tiny"
    service_name: Annotated[str, Env("JUPYTERHUB_SERVICE_NAME")] = "mochi-lab"
    prefix: Annotated[str, Env("JUPYTERHUB_SERVICE_PREFIX")] = "/"
    hub_api_url: Annotated[str | None, Env("JUPYTERHUB_API_URL")] = None
    # the service's token (reads users' admin flags)
    hub_api_token: Annotated[SecretStr | None, Env("JUPYTERHUB_API_TOKEN")] = None
    admin_groups: Annotated[list[str], Env("MOCHI_LAB_GATEWAY_ADMIN_GROUPS")] = Field(default_factory=list)
    # sha256(token) hex -> {"account": ..., "admin": bool}; JSON, or "@/path/to/file.json"
    static_tokens: Annotated[dict[str, Any], Env("MOCHI_LAB_GATEWAY_TOKENS")] = Field(default_factory=dict)
    # how long a hub answer (yes or no) is kept: a revoked token works this long
    auth_cache_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_AUTH_CACHE_S")] = 30.0
    # hub token checks in flight at once
    hub_lookups: Annotated[int, Env("MOCHI_LAB_GATEWAY_HUB_LOOKUPS")] = Field(default=8, ge=1, le=1024)
    # how long a token check waits for a free lookup and then for the hub's answer (past it: 503)
    hub_timeout_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_HUB_TIMEOUT_S")] = Field(default=5.0, gt=0)
    # a client with this many failed hub lookups within the window gets 429 until the oldest ages out
    auth_failures: Annotated[int, Env("MOCHI_LAB_GATEWAY_AUTH_FAILURES")] = Field(default=20, ge=1)
    auth_failures_window_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_AUTH_FAILURES_WINDOW_S")] = Field(
        default=60.0, gt=0)
    max_active_jobs: Annotated[int, Env("MOCHI_LAB_MAX_ACTIVE_JOBS")] = 20  # queued + running jobs per account
    # open GET /events streams per account (per gateway process)
    max_event_streams: Annotated[int, Env("MOCHI_LAB_GATEWAY_MAX_EVENT_STREAMS")] = Field(default=32, ge=1)
    # experiment records per account
    max_experiments: Annotated[int, Env("MOCHI_LAB_GATEWAY_MAX_EXPERIMENTS")] = Field(default=100, ge=1)
    # one experiment record, as JSON
    max_experiment_bytes: Annotated[int, Env("MOCHI_LAB_GATEWAY_MAX_EXPERIMENT_BYTES")] = Field(
        default=1 << 20, ge=1024)
    events_poll_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_EVENTS_POLL_S")] = 0.05
    events_max_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_EVENTS_MAX_S")] = 6 * 3600.0
    # The pool controller (mochi_lab.pool.controller, ScalingConfig.from_env()) sizes the pool from the queue;
    # off: the pool is MOCHI_LAB_WORKERS actors, resized by an admin only.
    autoscale: Annotated[bool, Env("MOCHI_LAB_AUTOSCALE")] = False
    # Proxies whose X-Forwarded-Proto/-For are believed (IPs or CIDRs, comma separated in the environment)
    trusted_proxies: Annotated[list[str], Env("MOCHI_LAB_GATEWAY_TRUSTED_PROXIES")] = Field(
        default_factory=lambda: ["127.0.0.1"])
    # The web page's sign-in: JupyterHub OAuth (the service's registration: oauth_client_id and
    # oauth_redirect_uri). public_hub_url is where browsers reach the hub ("https://hub.example.org/hub/";
    # None: "/hub/" on the page's own origin, as behind the hub's proxy); an https one makes every
    # cookie Secure. A signed-in browser's session lasts session_s at most.
    public_hub_url: Annotated[str | None, Env("JUPYTERHUB_PUBLIC_HUB_URL")] = None
    oauth_client_id: Annotated[str | None, Env("JUPYTERHUB_CLIENT_ID")] = None  # None: service-<service_name>
    # None: <prefix>oauth_callback
    oauth_callback_url: Annotated[str | None, Env("JUPYTERHUB_OAUTH_CALLBACK_URL")] = None
    # empty: the hub's default (its own access scope)
    oauth_scopes: Annotated[list[str], Env("JUPYTERHUB_OAUTH_SCOPES")] = Field(default_factory=list)
    session_s: Annotated[float, Env("MOCHI_LAB_GATEWAY_SESSION_S")] = Field(default=12 * 3600.0, gt=0)

    @field_validator("admin_groups", "trusted_proxies", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [g.strip() for g in v.split(",") if g.strip()] if isinstance(v, str) else v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {item!r} is not an IP address or CIDR network") from None
        return v

    @field_validator("oauth_scopes", mode="before")
    @classmethod
    def _scopes(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v  # JupyterHub gives services a JSON list

    @model_validator(mode="after")
    def _callback_under_prefix(self) -> "GatewayConfig":
        if not urlsplit(self.callback_url).path.startswith(self.prefix):
            raise ValueError(f"oauth_callback_url ({self.callback_url!r:.100}) must be a URL or path under the "
                             f"service prefix {self.prefix}: the sign-in's cookies live there")
        return self

    @field_validator("static_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = Path(v[1:]).read_text() if v.startswith("@") else v
            v = json.loads(text) if text.strip() else {}
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return "/" + v.strip("/") + "/" if v.strip("/") else "/"

    @field_validator("max_active_jobs")
    @classmethod
    def _quota(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_active_jobs must be at least 1")
        return v

    @property
    def client_id(self) -> str:
        return self.oauth_client_id or f"service-{self.service_name}"

    @property
    def callback_url(self) -> str:
        return self.oauth_callback_url or f"{self.prefix}oauth_callback"

    @classmethod
    def environment(cls) -> dict[str, Any]:
        values = super().environment()
        if "public_hub_url" not in values and os.environ.get("JUPYTERHUB_HOST"):
            # as JupyterHub gives its services: the public host and the hub's base URL
            base = (os.environ.get("JUPYTERHUB_BASE_URL") or "/").rstrip("/")
            values["public_hub_url"] = f"{os.environ['JUPYTERHUB_HOST'].rstrip('/')}{base}/hub/"
        return values
