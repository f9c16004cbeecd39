"""Typed settings, in one place. Every field can be set by an environment variable."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

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
    # Ray's own default head port is 6379, which Redis usually holds
    ray_port: int = 6390
    workers: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    cpus_per_worker: int = 1
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
    offload: bool = False  # model CPU offload, for GPUs under ~48 GB

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
            "lease_s": "MOCHI_LAB_LEASE_S",
            "offload": "MOCHI_LAB_OFFLOAD",
        }.items():
            if os.environ.get(var):
                env[name] = os.environ[var]
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)

    @property
    def store_url(self) -> str:
        return self.redis_url or f"sqlite:///{self.data_dir / 'store.sqlite3'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"
