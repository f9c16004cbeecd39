"""Installs of the repository into fresh venvs, as a user's clone would be installed
(tests/display/widgets/test_install_save_hook.py, tests/client/test_thin_client.py, benchmarks/thin_client.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Installed by none of the extras that a notebook or a script talking to a gateway needs.
HEAVY = ("torch", "diffusers", "transformers", "ray", "fastapi", "uvicorn", "peft")


def run(args: list, env: dict, timeout: float = 300) -> str:
    """Run `args`; its stdout, or an assertion error with the end of both streams."""
    done = subprocess.run([str(a) for a in args], check=False, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def clone(dest: Path) -> Path:
    """A copy of the repository without build outputs and caches (a build writes into its source folder)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".*_cache", ".ipynb_checkpoints"))
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH or the user's site: a venv's python sees only what it installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("JUPYTERHUB_")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def make_venv(path: Path, env: dict, *, system_site_packages: bool = False) -> Path:
    """A fresh venv at `path` (with pip unless it sees this interpreter's packages); its python."""
    flags = ["--system-site-packages", "--without-pip"] if system_site_packages else []
    run([sys.executable, "-m", "venv", *flags, path], env)
    return path / "bin" / "python"


def pip_list(python: Path, env: dict) -> dict[str, str]:
    """The venv's distributions, by normalised name -> version."""
    out = run([python, "-m", "pip", "list", "--format=freeze"], env)
    pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pairs}


def site_packages_bytes(python: Path, env: dict, *, leave_out: tuple[str, ...] = ()) -> int:
    """Bytes allocated on disk under the venv's site-packages, less the top-level entries named in `leave_out`."""
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env).strip())
    total = 0
    for entry in site.iterdir():
        if entry.name.split("-")[0].lower() in leave_out:
            continue
        files = [entry] if entry.is_file() else (p for p in entry.rglob("*") if p.is_file() and not p.is_symlink())
        total += sum(p.stat().st_blocks * 512 for p in files)  # allocated, as du counts
    return total


__all__ = ["HEAVY", "REPO", "clean_env", "clone", "make_venv", "pip_list", "run", "site_packages_bytes"]
