"""The heavier tiers' two lanes under xdist (`-n 2`): which lane a test runs in, in what order, and the lock that
keeps the tests that load every core from running beside the other lane's.

Their tests wait more than they compute (starts of Ray, JupyterLab, Chromium, pip), so two lanes share two
cores. What they must not share them with is a test that keeps both cores busy for a minute: a gang of ranks,
inductor, the session's multi-node Ray with its pool and gangs. With the lanes free to overlap, a notebook's Ray
started beside the multi-node Ray's gang tests: its dashboard agent took 47 s to start, past Ray's fixed 30 s
wait for the node (mochi_lab's one retry then started it); with two busy processes beside the suite as well,
both tries failed."""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The second lane: tests that drive other programs. The first holds the rest: the Rays the tests drive
# themselves, then ALONE's tests, the session's multi-node Ray last.
PROGRAMS = {"chromium", "package_install", "mkdocs", "shellcheck", "cluster_scripts"}
# Tests that load every core: each runs with no test of the other lane beside it.
ALONE = {"gloo_ranks", "torch_compile", "ray_cluster"}


def names(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ()))


def order(item: pytest.Item) -> int:
    """The session's multi-node Ray's tests last (once started, it idles beside every later test until the
    session ends), the other ALONE tests just before them."""
    used = names(item)
    return 2 if "ray_cluster" in used else 1 if ALONE & used else 0


def lane(item: pytest.Item) -> str:
    """The xdist group of a test of the heavier tiers."""
    used = names(item)
    programs = not ALONE & used and (item.path.suffix == ".ipynb" or bool(PROGRAMS & used))
    return "heavy-programs" if programs else "heavy-main"


def lock_path(config: pytest.Config) -> Path | None:
    """The lock both lanes of this run share; None outside an xdist worker."""
    uid = getattr(config, "workerinput", {}).get("testrunuid")
    return Path(tempfile.gettempdir()) / f"mochi-tests-lanes-{uid}.lock" if uid else None


@contextlib.contextmanager
def turn(item: pytest.Item) -> Iterator[None]:
    """While a test of a lane runs (setup, call, teardown): a shared hold, or an exclusive one for an ALONE test,
    which so waits for the other lane's running test to end, and keeps the next one waiting."""
    group = item.get_closest_marker("xdist_group")
    path = lock_path(item.config)
    if path is None or group is None or not str(group.args[0]).startswith("heavy-"):
        yield
        return
    with path.open("a") as held:  # closing it releases the lock
        fcntl.flock(held, fcntl.LOCK_EX if ALONE & names(item) else fcntl.LOCK_SH)
        yield
