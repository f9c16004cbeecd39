"""Typed settings, in one place. Every field can be set by an environment variable."""

from __future__ import annotations

import getpass
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
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


def redis_url_from_env() -> str | None:
    """REDIS_URL wins; else the seed's REDIS_HOST/REDIS_PORT/REDIS_DB; else None (SQLite)."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    host = os.environ.get("REDIS_HOST")
    if not host:
        return None
    return f"redis://{host}:{os.environ.get('REDIS_PORT', '6379')}/{os.environ.get('REDIS_DB', '0')}"


class Settings(BaseModel):
    """What a handle, a worker and the CLI need to know. `Settings.from_env()` reads the environment."""

    ray_address: str | None = None
    redis_url: str | None = None
    account: str = Field(default_factory=default_account)
    data_dir: Path = Field(default_factory=_data_home)
    cache_dir: Path = Field(default_factory=_cache_home)
    namespace: str = "mochi_lab"
    workers: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    cpus_per_worker: int = 1
    # GPUs per worker: 2 (the production shape, 2 GPUs per worker) runs one video's CFG halves on both GPUs
    # (mochi_lab.pool.gang); 1 is one single-GPU worker per GPU. gang_timeout_s bounds how long one rank of a
    # 2-GPU worker waits for the other (forming the pair, a collective, a model switch).
    gpus_per_worker: Literal[1, 2] = 1
    gang_timeout_s: float = 600.0
    # whether workers ask Ray for GPUs; None: when the cluster has GPUs now. A pool that scales from zero
    # sets it: its workers must ask for a GPU while no GPU node exists yet.
    gpu_workers: bool | None = None
    # extra Ray resources each worker needs, e.g. {"h100": 1} to pin the pool to a node group
    worker_resources: dict[str, float] = Field(default_factory=dict)
    lease_s: float = 30.0
    max_attempts: int = 3
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
    cancel_grace_s: float = 30.0
    max_run_s: float = 3600.0
    health_check_s: float = 1.0
    offload: bool = False  # model CPU offload, for GPUs under ~48 GB
    # With no ray_address: True attaches to (or starts) the local runtime that outlives kernels
    # (mochi_lab.pool.runtime); False starts a Ray inside this process that dies with it.
    persistent: bool = True
    # The local runtime stops itself after this long with no attached handle and no busy worker; and,
    # with no attached handle, after its store has been unreachable this long (or runtime_idle_s if shorter).
    runtime_idle_s: float = 1800.0
    runtime_store_gone_s: float = Field(default=300.0, gt=0)
    # Live previews: every preview_every denoising steps (0: about every 10 % of them; -1: none), at most
    # one per preview_min_interval_s.
    preview_every: int = 0
    preview_min_interval_s: float = 1.0
    # Admission: the largest job (latent tokens x steps) each model's pool accepts; None: no limit.
    # The defaults fit one job in well under an hour: the tiny model on a CPU, Genmo's reference
    # video (163 frames, 848x480, 64 steps = 2.85M) on an H100. Pool owners set their own.
    max_token_steps: dict[str, int | None] = Field(
        default_factory=lambda: {"tiny": 1_000_000, "mochi-1-preview": 3_000_000})
    # Prometheus metrics of the pool owner (mochi_lab.pool.metrics: the gateway, or the embedded default when
    # set) on their own port, on metrics_host (0: a free port; None: off). Accounts become a label of
    # the queue gauge only with metrics_accounts (their number is the number of users).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_accounts: bool = False
    # the Ray dashboard the ClusterPanel links to; None: the one Ray reports, when it answers
    ray_dashboard_url: str | None = None
    # Tests only (mochi_lab.worker.gate): a folder of hold files that stop jobs at a chosen stage or step.
    test_gates: Path | None = None

    @field_validator("account")
    @classmethod
    def _account(cls, v: str) -> str:
        return check_account(v)

    @field_validator("gpus_per_worker", mode="before")
    @classmethod
    def _gpus_from_text(cls, v: Any) -> Any:
        return int(v) if isinstance(v, str) and v.strip().isdigit() else v  # the environment's "2"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env: dict = {
            "ray_address": os.environ.get("RAY_ADDRESS") or None,
            "redis_url": redis_url_from_env(),
        }
        for name, var in {
            "data_dir": "MOCHI_LAB_DATA_DIR",
            "cache_dir": "MOCHI_LAB_CACHE_DIR",
            "namespace": "MOCHI_LAB_NAMESPACE",
            "workers": "MOCHI_LAB_WORKERS",
            "cpus_per_worker": "MOCHI_LAB_CPUS_PER_WORKER",
            "gpus_per_worker": "MOCHI_LAB_GPUS_PER_WORKER",
            "gang_timeout_s": "MOCHI_LAB_GANG_TIMEOUT_S",
            "gpu_workers": "MOCHI_LAB_GPU_WORKERS",
            "lease_s": "MOCHI_LAB_LEASE_S",
            "cancel_grace_s": "MOCHI_LAB_CANCEL_GRACE_S",
            "max_run_s": "MOCHI_LAB_MAX_RUN_S",
            "offload": "MOCHI_LAB_OFFLOAD",
            "persistent": "MOCHI_LAB_PERSISTENT",
            "runtime_idle_s": "MOCHI_LAB_RUNTIME_IDLE_S",
            "runtime_store_gone_s": "MOCHI_LAB_RUNTIME_STORE_GONE_S",
            "preview_every": "MOCHI_LAB_PREVIEW_EVERY",
            "preview_min_interval_s": "MOCHI_LAB_PREVIEW_MIN_INTERVAL_S",
            "max_token_steps": "MOCHI_LAB_MAX_TOKEN_STEPS",  # JSON, e.g. {"mochi-1-preview": 6000000}
            "metrics_port": "MOCHI_LAB_METRICS_PORT",
            "metrics_host": "MOCHI_LAB_METRICS_HOST",
            "metrics_accounts": "MOCHI_LAB_METRICS_ACCOUNTS",
            "ray_dashboard_url": "MOCHI_LAB_RAY_DASHBOARD_URL",
            "test_gates": "MOCHI_LAB_TEST_GATES",
        }.items():
            if os.environ.get(var):
                env[name] = os.environ[var]
        if isinstance(env.get("max_token_steps"), str):
            env["max_token_steps"] = json.loads(env["max_token_steps"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)

    @property
    def store_url(self) -> str:
        return self.redis_url or f"sqlite:///{self.data_dir / 'store.sqlite3'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"


class ScalingConfig(BaseModel):
    """The pool controller's settings (mochi_lab.pool.controller), from its owner's configuration.

    Every `interval_s` the pool is sized to clamp(ceil((queued + running jobs) / target_per_worker),
    min_workers, max_workers). Growing is immediate; a worker is retired only once it has been idle for
    `idle_timeout_s`, and at most once per `cooldown_s` (no flapping). `headroom_workers` > 0 asks the
    Ray autoscaler (request_resources) to keep room for that many workers more than the pool has."""

    model_config = ConfigDict(extra="forbid")

    min_workers: int = Field(default=0, ge=0, le=1024)
    max_workers: int = Field(default=4, ge=0, le=1024)
    target_per_worker: int = Field(default=1, ge=1, le=1000)
    idle_timeout_s: float = Field(default=300.0, ge=0)
    cooldown_s: float = Field(default=60.0, ge=0)
    interval_s: float = Field(default=2.0, gt=0, le=60)
    headroom_workers: int = Field(default=0, ge=0, le=1024)

    @field_validator("max_workers")
    @classmethod
    def _bounds(cls, v: int, info: Any) -> int:
        low = info.data.get("min_workers")
        if low is not None and v < low:
            raise ValueError(f"max_workers ({v}) must be at least min_workers ({low})")
        return v

    @classmethod
    def from_env(cls, **overrides: Any) -> "ScalingConfig":
        """MOCHI_LAB_MIN_WORKERS, MOCHI_LAB_MAX_WORKERS, MOCHI_LAB_TARGET_PER_WORKER, MOCHI_LAB_IDLE_TIMEOUT_S,
        MOCHI_LAB_SCALE_COOLDOWN_S, MOCHI_LAB_SCALE_INTERVAL_S, MOCHI_LAB_HEADROOM_WORKERS."""
        names = {"min_workers": "MOCHI_LAB_MIN_WORKERS", "max_workers": "MOCHI_LAB_MAX_WORKERS",
                 "target_per_worker": "MOCHI_LAB_TARGET_PER_WORKER", "idle_timeout_s": "MOCHI_LAB_IDLE_TIMEOUT_S",
                 "cooldown_s": "MOCHI_LAB_SCALE_COOLDOWN_S", "interval_s": "MOCHI_LAB_SCALE_INTERVAL_S",
                 "headroom_workers": "MOCHI_LAB_HEADROOM_WORKERS"}
        values: dict[str, Any] = {name: os.environ[var] for name, var in names.items() if os.environ.get(var)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# The gateway's settings and their environment variables.
_GATEWAY_ENV = {
    "host": "MOCHI_LAB_GATEWAY_HOST",
    "port": "MOCHI_LAB_GATEWAY_PORT",
    "model": "MOCHI_LAB_MODEL",
    "service_name": "JUPYTERHUB_SERVICE_NAME",
    "prefix": "JUPYTERHUB_SERVICE_PREFIX",
    "hub_api_url": "JUPYTERHUB_API_URL",
    "hub_api_token": "JUPYTERHUB_API_TOKEN",
    "admin_groups": "MOCHI_LAB_GATEWAY_ADMIN_GROUPS",
    "static_tokens": "MOCHI_LAB_GATEWAY_TOKENS",
    "auth_cache_s": "MOCHI_LAB_GATEWAY_AUTH_CACHE_S",
    "max_active_jobs": "MOCHI_LAB_MAX_ACTIVE_JOBS",
    "events_poll_s": "MOCHI_LAB_GATEWAY_EVENTS_POLL_S",
    "events_max_s": "MOCHI_LAB_GATEWAY_EVENTS_MAX_S",
    "autoscale": "MOCHI_LAB_AUTOSCALE",
    "trusted_proxies": "MOCHI_LAB_GATEWAY_TRUSTED_PROXIES",
    "hub_lookups": "MOCHI_LAB_GATEWAY_HUB_LOOKUPS",
    "hub_timeout_s": "MOCHI_LAB_GATEWAY_HUB_TIMEOUT_S",
    "auth_failures": "MOCHI_LAB_GATEWAY_AUTH_FAILURES",
    "auth_failures_window_s": "MOCHI_LAB_GATEWAY_AUTH_FAILURES_WINDOW_S",
    "max_event_streams": "MOCHI_LAB_GATEWAY_MAX_EVENT_STREAMS",
    "max_experiments": "MOCHI_LAB_GATEWAY_MAX_EXPERIMENTS",
    "max_experiment_bytes": "MOCHI_LAB_GATEWAY_MAX_EXPERIMENT_BYTES",
    "public_hub_url": "JUPYTERHUB_PUBLIC_HUB_URL",
    "oauth_client_id": "JUPYTERHUB_CLIENT_ID",
    "oauth_callback_url": "JUPYTERHUB_OAUTH_CALLBACK_URL",
    "oauth_scopes": "JUPYTERHUB_OAUTH_SCOPES",
    "session_s": "MOCHI_LAB_GATEWAY_SESSION_S",
}


class GatewayConfig(BaseModel):
    """The gateway's own settings (the store, Ray and pool ones are `Settings`). `from_env` reads the
    variables in `_GATEWAY_ENV`; keyword overrides win."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8770
    model: str = "tiny"  # the model of the pool the gateway owns (it creates or re-attaches it at start)
    service_name: str = "mochi-lab"
    prefix: str = "/"
    hub_api_url: str | None = None
    hub_api_token: SecretStr | None = None  # the service's token (reads users' admin flags)
    admin_groups: list[str] = Field(default_factory=list)
    # sha256(token) hex -> {"account": ..., "admin": bool}; JSON, or "@/path/to/file.json"
    static_tokens: dict[str, Any] = Field(default_factory=dict)
    auth_cache_s: float = 30.0  # how long a hub answer (yes or no) is kept: a revoked token works this long
    hub_lookups: int = Field(default=8, ge=1, le=1024)  # hub token checks in flight at once
    # how long a token check waits for a free lookup and then for the hub's answer (past it: 503)
    hub_timeout_s: float = Field(default=5.0, gt=0)
    # a client with this many failed hub lookups within the window gets 429 until the oldest ages out
    auth_failures: int = Field(default=20, ge=1)
    auth_failures_window_s: float = Field(default=60.0, gt=0)
    max_active_jobs: int = 20  # queued + running jobs per account
    max_event_streams: int = Field(default=32, ge=1)  # open GET /events streams per account (per gateway process)
    max_experiments: int = Field(default=100, ge=1)  # experiment records per account
    max_experiment_bytes: int = Field(default=1 << 20, ge=1024)  # one experiment record, as JSON
    events_poll_s: float = 0.05
    events_max_s: float = 6 * 3600.0
    # The pool controller (mochi_lab.pool.controller, ScalingConfig.from_env()) sizes the pool from the queue;
    # off: the pool is MOCHI_LAB_WORKERS actors, resized by an admin only.
    autoscale: bool = False
    # Proxies whose X-Forwarded-Proto/-For are believed (IPs or CIDRs, comma separated in the environment)
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    # The web page's sign-in: JupyterHub OAuth (the service's registration: oauth_client_id and
    # oauth_redirect_uri). public_hub_url is where browsers reach the hub ("https://hub.example.org/hub/";
    # None: "/hub/" on the page's own origin, as behind the hub's proxy); an https one makes every
    # cookie Secure. A signed-in browser's session lasts session_s at most.
    public_hub_url: str | None = None
    oauth_client_id: str | None = None  # None: service-<service_name>
    oauth_callback_url: str | None = None  # None: <prefix>oauth_callback
    oauth_scopes: list[str] = Field(default_factory=list)  # empty: the hub's default (its own access scope)
    session_s: float = Field(default=12 * 3600.0, gt=0)

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
    def from_env(cls, **overrides: Any) -> "GatewayConfig":
        values: dict[str, Any] = {name: os.environ[var] for name, var in _GATEWAY_ENV.items() if os.environ.get(var)}
        if "public_hub_url" not in values and os.environ.get("JUPYTERHUB_HOST"):
            # as JupyterHub gives its services: the public host and the hub's base URL
            base = (os.environ.get("JUPYTERHUB_BASE_URL") or "/").rstrip("/")
            values["public_hub_url"] = f"{os.environ['JUPYTERHUB_HOST'].rstrip('/')}{base}/hub/"
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
