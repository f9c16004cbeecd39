"""Shell scripts: shellcheck-clean, strict mode, usage text, argument errors."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import clusterlib as cl

NAMES = [str(p.relative_to(cl.CLUSTER)) for p in cl.SCRIPTS]
# the repository's own shell tools (CI's entry point, the soak runner): shellchecked like the deployment's
TOOLS = sorted([cl.REPO / ".ci" / "run", *(cl.REPO / "scripts").iterdir()])


def test_the_scripts_are_all_there():
    assert set(NAMES) == {
        "scripts/deploy-all.sh", "scripts/scale-workers.sh", "scripts/port-forward.sh",
        "scripts/build-images.sh", "local/up.sh", "local/down.sh",
    }


def test_the_tools_are_all_there():
    assert [str(p.relative_to(cl.REPO)) for p in TOOLS] == [".ci/run", "scripts/soak-tests"]


def test_shellcheck_passes(shellcheck):
    out = subprocess.run(
        [shellcheck, "--external-sources", "--severity=style", *map(str, [*cl.SCRIPTS, *TOOLS])],
        capture_output=True, text=True, timeout=120, cwd=cl.REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck_bites(shellcheck, tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nset -euo pipefail\nfor f in $(ls *.txt); do rm $f; done\n")
    out = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "SC2045" in out.stdout


@pytest.mark.parametrize("name", [*(f"cluster/{n}" for n in NAMES), *(str(p.relative_to(cl.REPO)) for p in TOOLS)])
def test_strict_mode_and_executable(name):
    path = cl.REPO / name
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines[:10], name
    assert os.access(path, os.X_OK), f"{name} is not executable"


@pytest.mark.parametrize("name", NAMES)
def test_help_and_bad_arguments(name):
    path = cl.CLUSTER / name
    for flag in ("-h", "--help"):
        out = subprocess.run(["bash", str(path), flag], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("Usage: cluster/"), out.stdout
    out = subprocess.run(["bash", str(path), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Usage:" in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ray-port", "6379"], "must not use 6379"),
        (["--ray-port", "6500", "--redis-port", "6500"], "must differ"),
        (["--ip", "127.0.0.1"], "primary interface"),
        (["--ip", "10.0.0.5"], "loopback"),
        (["--redis-bind", "0.0.0.0"], "loopback"),
        (["--workers", "0"], "at least 1"),
        (["--workers", "two"], "whole number"),
        (["--state-dir", "/tmp/" + "x" * 40], "too long"),
        (["--gateway", "--no-redis"], "needs Redis"),
        (["--gateway", "--model", "a b"], "model name"),
    ],
)
def test_local_up_refuses_bad_settings_before_starting_anything(args, message, tmp_path):
    env = {**os.environ, "MOCHI_LOCAL_STATE_DIR": str(tmp_path / "never")}
    out = subprocess.run(["bash", str(cl.CLUSTER / "local" / "up.sh"), *args],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "never" / "pids").exists() or not any((tmp_path / "never" / "pids").iterdir())


def test_local_down_is_a_no_op_without_a_cluster(tmp_path):
    for _ in range(2):
        out = subprocess.run(["bash", str(cl.CLUSTER / "local" / "down.sh"), "--state-dir", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "nothing to stop" in out.stdout


def test_soak_tests_usage_and_bad_arguments():
    soak = cl.REPO / "scripts" / "soak-tests"
    out = subprocess.run(["bash", str(soak), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("Usage: scripts/soak-tests"), out.stdout + out.stderr
    for args, message in ((["--tier", "nightly"], "unknown tier: nightly"), (["--repeat", "0"], "at least 1"),
                          (["--hogs", "two"], "whole number"), (["--no-such-option"], "unknown option")):
        out = subprocess.run(["bash", str(soak), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr and "Usage:" in out.stderr, (args, out.stderr)
