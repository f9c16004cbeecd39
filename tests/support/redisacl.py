"""A private redis-server started exactly as the manifests start Redis: the ConfigMap's start.sh
renders its users.acl with passwords from the environment and runs redis-server with the
StatefulSet's arguments. Only the port (a free one, never 6379), the directory (a temporary one) and
persistence (off) differ, and a test-only admin user is added to read ACL LOG. Stopped by its pid."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import clusterlib as cl
from tests.support.ports import free_port
from tests.support.tools import need_tool

ADMIN = "testadmin"  # exists only in the tests


def _expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


class RedisServer:
    def __init__(self, docs: list[dict], workdir: Path):
        self.docs, self.dir = docs, workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.admin_password = secrets.token_hex(16)
        sts = cl.find(docs, "StatefulSet", "mochi-redis")
        (self.container,) = sts["spec"]["template"]["spec"]["containers"]
        self.config = cl.find(docs, "ConfigMap", "mochi-redis-config")["data"]
        # one random password per user, in the env var the StatefulSet gives it
        self.env_names = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
                          for e in self.container["env"] if "valueFrom" in e}
        self.passwords = {var: secrets.token_hex(16) for var in self.env_names}

    def password(self, user: str) -> str:
        (var,) = re.findall(rf"^user {user} on >@([A-Z_]+)@", self.config["users.acl"], re.M)
        return self.passwords[var]

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.password(user)}@127.0.0.1:{self.port}/0"

    def client(self, user: str, password: str | None = None) -> redis.Redis:
        # no retries: a refused login is the answer, not a hiccup
        return redis.Redis(host="127.0.0.1", port=self.port, username=user, retry=Retry(NoBackoff(), 0),
                           password=password if password is not None else self.password(user), decode_responses=True)

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=ADMIN, password=self.admin_password,
                           decode_responses=True)

    def command(self, env_overrides: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
        for name, text in self.config.items():
            (self.dir / name).write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS")}
        plain = {e["name"]: e["value"] for e in self.container["env"] if "value" in e}
        env.update(plain)
        env.update(self.passwords)
        env.update(env_overrides or {})
        args = [_expand(a, env) for a in self.container["args"]]
        for flag, value in (("--port", str(self.port)), ("--dir", str(self.dir)), ("--appendonly", "no"), ("--save", "")):
            args[args.index(flag) + 1] = value
        script = self.container["command"][1]
        assert script == "/etc/mochi-redis/start.sh", script
        cmd = [self.container["command"][0], str(self.dir / "start.sh"), *args, "--bind", "127.0.0.1",
               "--user", ADMIN, "on", f">{self.admin_password}", "~*", "&*", "+@all"]
        return cmd, env

    def start(self) -> "RedisServer":
        need_tool("redis-server")  # start.sh execs it; skipped (failed when strict) naming its install line
        cmd, env = self.command()
        log = open(self.dir / "redis.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.admin().ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{(self.dir / 'redis.log').read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # start.sh execs redis-server: this pid is Redis
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def denials(self) -> list[dict]:
        """ACL LOG entries (refused commands and keys), oldest first."""
        return list(reversed(self.admin().execute_command("ACL", "LOG")))
