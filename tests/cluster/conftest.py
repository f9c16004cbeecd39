"""Fixtures for the offline deployment checks of cluster/ (see clusterlib.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.support import clusterlib as cl
from tests.support.tools import need_tool


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay, rendered offline by `kubectl kustomize`: {"dev": [docs], "prod": [docs]}."""
    return {name: cl.render(cl.K8S / "overlays" / name) for name in cl.OVERLAYS}


@pytest.fixture(scope="session")
def base_docs() -> list[dict]:
    return cl.render(cl.K8S / "base")


@pytest.fixture(scope="session")
def values() -> dict:
    return yaml.safe_load(cl.VALUES.read_text())


@pytest.fixture(scope="session")
def images_env() -> dict[str, str]:
    return cl.read_env_file(cl.IMAGES_ENV)


@pytest.fixture(scope="session")
def notebook_pods(values, tmp_path_factory) -> dict[str, dict]:
    """The single-user Pods of each profile, as KubeSpawner builds them from the z2jh values."""
    return cl.spawner_pods(values, tmp_path_factory.mktemp("kubespawner"))


@pytest.fixture(scope="session")
def redis_server() -> str:
    """redis-server's path: cluster/local/up.sh starts one (skipped, or failed when strict, where it is missing)."""
    return need_tool("redis-server")
