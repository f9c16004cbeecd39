"""The configs: one per consumer, each field beside the environment variable it reads, and config.py the
only module that reads the environment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from mochi_lab.config import (
    ClientConfig,
    EnvConfig,
    GatewayConfig,
    PoolConfig,
    ScalingConfig,
    Settings,
    StoreConfig,
    WorkerConfig,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (StoreConfig, WorkerConfig, PoolConfig, Settings, ClientConfig, ScalingConfig, GatewayConfig)
# Read outside the configs, by config.py's own functions: the models a cluster knows (known_models).
READ_ELSEWHERE = {"MOCHI_LAB_MODELS"}
# Named in cluster/ but read by the operator's scripts, not by the package.
SCRIPTS_ONLY = {"MOCHI_LAB_ADMIN_TOKEN"}


def _reads_environment(source: str) -> list[int]:
    """Lines that touch os.environ or os.getenv (reads and writes alike), however `os` is spelled."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "putenv", "unsetenv") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_config_reads_the_environment():
    found = {str(path.relative_to(ROOT)): lines for path in (ROOT / "mochi_lab").rglob("*.py")
             if (lines := _reads_environment(path.read_text()))}
    assert set(found) == {"mochi_lab/config.py"}, found


def test_the_checker_sees_an_environment_read():
    assert _reads_environment("import os\nx = os.environ.get('A')\n") == [2]
    assert _reads_environment("from os import getenv\n") == [1]
    assert _reads_environment("import os\nos.path.join('a')\n") == []


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_a_variable_names_one_field_of_a_config(config: type[EnvConfig]):
    names = list(config.env_vars().values())
    assert len(names) == len(set(names)), config.env_vars()
    assert all(re.fullmatch(r"(MOCHI_LAB|JUPYTERHUB|RAY)_[A-Z0-9_]+", n) for n in names), names


def test_every_variable_the_deployment_sets_is_read():
    read = {var for config in CONFIGS for var in config.env_vars().values()} | READ_ELSEWHERE
    deployed = {m for path in (ROOT / "cluster").rglob("*") if path.is_file() and path.suffix != ".png"
                for m in re.findall(r"MOCHI_LAB_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace"))}
    assert deployed, "cluster/ names no variable: the scan looks in the wrong place"
    assert deployed - SCRIPTS_ONLY <= read, sorted(deployed - SCRIPTS_ONLY - read)


def test_each_consumer_has_its_own_config_and_settings_holds_them_all():
    """A worker's config is a store's plus its loop's; the pool's owner's is a worker's plus Ray's and the
    pool's; Settings adds only whose jobs they are and the pipeline's offload."""
    store, worker, pool = (set(c.model_fields) for c in (StoreConfig, WorkerConfig, PoolConfig))
    assert store < worker < pool < set(Settings.model_fields)
    assert set(Settings.model_fields) - pool == {"account", "offload"}
    assert not {"ray_address", "workers", "namespace", "account", "metrics_port"} & worker
    assert not set(ClientConfig.model_fields) & {"redis_url", "ray_address", "account"}


# (variable, its text, the field, the value it gives)
SETTINGS_CASES = [
    ("RAY_ADDRESS", "127.0.0.1:6380", "ray_address", "127.0.0.1:6380"),
    ("MOCHI_LAB_DATA_DIR", "/tmp/mochi-data", "data_dir", Path("/tmp/mochi-data")),
    ("MOCHI_LAB_CACHE_DIR", "/tmp/mochi-cache", "cache_dir", Path("/tmp/mochi-cache")),
    ("MOCHI_LAB_NAMESPACE", "ns1", "namespace", "ns1"),
    ("MOCHI_LAB_WORKERS", "3", "workers", 3),
    ("MOCHI_LAB_CPUS_PER_WORKER", "2", "cpus_per_worker", 2),
    ("MOCHI_LAB_GPUS_PER_WORKER", "2", "gpus_per_worker", 2),
    ("MOCHI_LAB_GANG_TIMEOUT_S", "12.5", "gang_timeout_s", 12.5),
    ("MOCHI_LAB_GPU_WORKERS", "true", "gpu_workers", True),
    ("MOCHI_LAB_LEASE_S", "9", "lease_s", 9.0),
    ("MOCHI_LAB_CANCEL_GRACE_S", "4", "cancel_grace_s", 4.0),
    ("MOCHI_LAB_MAX_RUN_S", "60", "max_run_s", 60.0),
    ("MOCHI_LAB_OFFLOAD", "1", "offload", True),
    ("MOCHI_LAB_PERSISTENT", "0", "persistent", False),
    ("MOCHI_LAB_RUNTIME_IDLE_S", "5", "runtime_idle_s", 5.0),
    ("MOCHI_LAB_RUNTIME_STORE_GONE_S", "6", "runtime_store_gone_s", 6.0),
    ("MOCHI_LAB_PREVIEW_EVERY", "-1", "preview_every", -1),
    ("MOCHI_LAB_PREVIEW_MIN_INTERVAL_S", "0.5", "preview_min_interval_s", 0.5),
    ("MOCHI_LAB_MAX_TOKEN_STEPS", '{"mochi-1-preview": 6000000}', "max_token_steps", {"mochi-1-preview": 6000000}),
    ("MOCHI_LAB_METRICS_PORT", "0", "metrics_port", 0),
    ("MOCHI_LAB_METRICS_HOST", "0.0.0.0", "metrics_host", "0.0.0.0"),
    ("MOCHI_LAB_METRICS_ACCOUNTS", "yes", "metrics_accounts", True),
    ("MOCHI_LAB_RAY_DASHBOARD_URL", "http://ray:8265", "ray_dashboard_url", "http://ray:8265"),
    ("MOCHI_LAB_TEST_GATES", "/tmp/gates", "test_gates", Path("/tmp/gates")),
    ("MOCHI_LAB_MAX_ADAPTER_BYTES", "4096", "max_adapter_bytes", 4096),
    ("MOCHI_LAB_MAX_ADAPTER_RANK", "32", "max_adapter_rank", 32),
    ("MOCHI_LAB_MAX_ADAPTERS", "7", "max_adapters", 7),
    ("MOCHI_LAB_LORA_CACHE", "2", "lora_cache", 2),
]


def test_the_cases_cover_every_settings_variable():
    assert {var for var, *_ in SETTINGS_CASES} == set(Settings.env_vars().values())


@pytest.mark.parametrize("var,text,field,value", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_settings_from_env_reads_each_variable(monkeypatch, var, text, field, value):
    monkeypatch.setenv(var, text)
    assert getattr(Settings.from_env(), field) == value
    # the consumer that owns the field reads it too
    owner = next(c for c in (StoreConfig, WorkerConfig, PoolConfig, Settings) if field in c.model_fields)
    assert getattr(owner.from_env(), field) == value
    monkeypatch.setenv(var, "")  # empty is unset
    assert getattr(Settings.from_env(), field) == Settings.model_fields[field].get_default(call_default_factory=True)


def test_an_override_wins_and_none_leaves_the_environment(monkeypatch):
    monkeypatch.setenv("MOCHI_LAB_WORKERS", "3")
    assert Settings.from_env(workers=5).workers == 5
    assert Settings.from_env(workers=None).workers == 3


def test_the_store_url_comes_from_redis_url_else_the_seeds_host(monkeypatch, tmp_path):
    for var in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOCHI_LAB_DATA_DIR", str(tmp_path))
    assert StoreConfig.from_env().store_url == f"sqlite:///{tmp_path / 'store.sqlite3'}"
    monkeypatch.setenv("REDIS_HOST", "redis.svc")
    monkeypatch.setenv("REDIS_DB", "2")
    assert Settings.from_env().store_url == "redis://redis.svc:6379/2"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/5")
    assert WorkerConfig.from_env().redis_url == "redis://127.0.0.1:6379/5"


def test_a_bad_value_names_the_field(monkeypatch):
    monkeypatch.setenv("MOCHI_LAB_GPUS_PER_WORKER", "3")
    with pytest.raises(ValidationError, match="gpus_per_worker"):
        Settings.from_env()


def test_the_scaling_and_gateway_variables(monkeypatch):
    monkeypatch.setenv("MOCHI_LAB_SCALE_COOLDOWN_S", "7")
    monkeypatch.setenv("MOCHI_LAB_MAX_WORKERS", "9")
    scaling = ScalingConfig.from_env(min_workers=2)
    assert (scaling.cooldown_s, scaling.max_workers, scaling.min_workers) == (7.0, 9, 2)
    monkeypatch.setenv("MOCHI_LAB_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/services/mochi-lab")
    monkeypatch.delenv("JUPYTERHUB_PUBLIC_HUB_URL", raising=False)
    monkeypatch.setenv("JUPYTERHUB_HOST", "https://hub.example.org/")
    monkeypatch.setenv("JUPYTERHUB_BASE_URL", "/base/")
    gateway = GatewayConfig.from_env(port=9000)
    assert gateway.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"] and gateway.port == 9000
    assert gateway.prefix == "/services/mochi-lab/"
    assert gateway.public_hub_url == "https://hub.example.org/base/hub/"


def test_the_client_config(monkeypatch, tmp_path):
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", "http://gw/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "secret-token")
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOCHI_LAB_DOWNLOAD_DIR", raising=False)
    client = ClientConfig.from_env()
    assert (client.gateway, client.token_text, client.cache_dir) == ("http://gw/", "secret-token", tmp_path)
    assert client.download_dir == Path("mochi_videos") and "secret-token" not in repr(client)
    monkeypatch.setenv("MOCHI_LAB_DOWNLOAD_DIR", str(tmp_path / "videos"))
    assert ClientConfig.from_env().download_dir == tmp_path / "videos"
