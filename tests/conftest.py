"""Session fixtures: real services, started once. Ray stays on 127.0.0.1; Redis is the real server."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.support.rayenv import TEST_RAY_PRIORITY

# A user's clone has nothing beside it: a test that opens a file next to the repository fails here as it
# would for them. Dot folders there (a home's settings) and a parent that is /, /tmp or /home stay readable.
_REPO = Path(__file__).resolve().parents[1]
_BESIDE = str(_REPO.parent) + os.sep
_GUARDED = _REPO.parent not in {Path("/"), Path(tempfile.gettempdir()).resolve(), Path.home().parent}


def _no_reads_outside_the_repo(event: str, args: tuple) -> None:
    if event == "open" and _GUARDED and isinstance(args[0], (str, os.PathLike)):
        path = os.path.abspath(os.fspath(args[0]))
        if path.startswith(_BESIDE):
            beside = path[len(_BESIDE):].split(os.sep, 1)[0]
            if beside != _REPO.name and not beside.startswith("."):
                raise PermissionError(f"tests must not read outside the repository: {path}")


sys.addaudithook(_no_reads_outside_the_repo)

# Must precede `import ray` anywhere in the session: keeps every Ray node on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token auth would write ~/.ray/auth_token; test clusters live on loopback and die with the session.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.update(TEST_RAY_PRIORITY)
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mochi-tests-"))
# Nothing in the tests may touch the user's data, cache or account.
os.environ["MOCHI_LAB_DATA_DIR"] = str(_SESSION_HOME / "data")
os.environ["MOCHI_LAB_CACHE_DIR"] = os.environ.get("MOCHI_LAB_TEST_CACHE", str(_SESSION_HOME / "cache"))
os.environ["JUPYTERHUB_USER"] = "alice"
# A checkpoint with NaN weights, for pipeline-failure tests; workers inherit this when Ray starts.
BROKEN_CHECKPOINT = _SESSION_HOME / "tiny-broken"
os.environ["MOCHI_LAB_MODELS"] = json.dumps({"tiny-broken": str(BROKEN_CHECKPOINT)})
for var in ("RAY_ADDRESS", "REDIS_URL", "REDIS_HOST", "MOCHI_LAB_GATEWAY", "JUPYTERHUB_API_TOKEN"):
    os.environ.pop(var, None)
# The embedded default in kernels and CLI runs of the tests keeps a Ray of its own that dies with it (every
# notebook its own cluster, reaped); tests/pool/runtime/test_runtime.py turns the persistent local runtime on
# where it tests it.
os.environ["MOCHI_LAB_PERSISTENT"] = "0"
# Jobs held at a stage or step for the tests that act while one runs (tests/support/gate.py); set before
# any worker starts, so Ray's workers and the runtime daemons inherit it.
os.environ["MOCHI_LAB_TEST_GATES"] = str(_SESSION_HOME / "gates")
(_SESSION_HOME / "gates").mkdir()
RUNTIMES = _SESSION_HOME / "runtimes"  # data dirs of the persistent runtimes the tests start

import pytest  # noqa: E402

from tests.support import lanes  # noqa: E402
from tests.support.hub_fixtures import gateway, hub, storefront, tokens  # noqa: E402,F401  (one hub per session)
from tests.support.jobkit import TINY  # noqa: E402
from tests.support.tools import need_redis, need_tool  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from mochi_lab.pipelines.tiny import ensure_tiny_mochi

    return ensure_tiny_mochi(os.environ["MOCHI_LAB_CACHE_DIR"])


@pytest.fixture(scope="session")
def broken_checkpoint(tiny_checkpoint) -> Path:
    """The tiny Mochi with NaN transformer output weights, registered as model "tiny-broken"."""
    import torch
    from diffusers import MochiPipeline

    pipe = MochiPipeline.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.fill_(float("nan"))
    pipe.save_pretrained(BROKEN_CHECKPOINT)
    return BROKEN_CHECKPOINT


# -- tiers ------------------------------------------------------------------------------------------------
# A test's tier follows from the fixtures it uses (so it cannot drift): README's command runs the rest, the
# fast tier; CI also runs `-m integration` and `-m e2e`. Notebooks (nbval) are e2e.
TIER_OF_FIXTURE = {
    "ray_cluster": "integration",  # a multi-node Ray: the pool, the gang, the controller, metrics on Ray
    "ray_local": "integration",  # a Ray of the test's own (the embedded default, the runtime daemon)
    "gloo_ranks": "integration",  # processes of a torch.distributed group: CFG and sequence-parallel gangs
    "torch_compile": "integration",  # inductor compiles (a minute and more with a cold cache)
    "chromium": "e2e",  # JupyterLab or the gateway's page in a real browser
    "shellcheck": "e2e",  # the deployment scripts
    "cluster_scripts": "e2e",  # cluster/local/up.sh and friends: a Ray cluster and Redis of their own
    "autoscaler": "e2e",  # Ray's autoscaler with its fake multi-node provider
    "fault_injection": "e2e",  # processes and servers killed on purpose
    # Neither a Ray nor a browser, but minutes: not in README's command
    "package_install": "integration",  # pip installs of the repository into fresh venvs
    "mkdocs": "integration",  # the docs site's strict build (half a minute and more: it imports the gateway, torch)
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    items.sort(key=lanes.order)
    for item in items:
        tiers = {TIER_OF_FIXTURE[f] for f in lanes.names(item) if f in TIER_OF_FIXTURE}
        if item.path.suffix == ".ipynb":
            tiers.add("e2e")
        for tier in ("e2e",) if "e2e" in tiers else tiers:
            item.add_marker(getattr(pytest.mark, tier))
        # xdist (`-n 2` in addopts) spreads the fast tier's tests over two processes, the heavier tiers' tests
        # over two lanes, each one process (tests/support/lanes.py)
        if tiers:
            item.add_marker(pytest.mark.xdist_group(lanes.lane(item)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with lanes.turn(item):
        return (yield)


def pytest_sessionfinish(session):
    # this lane's tests are done: the other lane needs the lock no more (a later open makes a new file)
    if (path := lanes.lock_path(session.config)) is not None:
        path.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # CI runs the integration and e2e tiers in one session (one hub, one multi-node Ray, one pool and gang for
    # both): each tier's time is what its tests took, setup and teardown included.
    spent: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) not in ("setup", "call", "teardown"):
                continue
            tier = next((t for t in ("e2e", "integration") if t in rep.keywords), "default")
            spent[tier] = spent.get(tier, 0.0) + rep.duration
            tests.setdefault(tier, set()).add(rep.nodeid)
    if len(spent) > 1 or "default" not in spent:
        terminalreporter.write_sep("=", "time by tier")
        for tier, seconds in sorted(spent.items()):
            terminalreporter.write_line(f"{tier}: {seconds:.0f} s over {len(tests[tier])} tests")


# -- system tools (tests/support/tools.py): skipped with the line that installs them, failed when strict ----
@pytest.fixture(scope="session")
def chromium() -> str:
    return need_tool("chromium")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return need_tool("shellcheck")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return need_tool("kubectl")


@pytest.fixture(scope="session")
def mkdocs() -> str:
    return need_tool("mkdocs")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis on 127.0.0.1:6379 (skipped, or failed when strict, where none answers)."""
    return need_redis()


@pytest.fixture()
def fault_injection() -> None:
    """Marks a test that kills processes or servers on purpose (the e2e tier)."""


@pytest.fixture()
def package_install() -> None:
    """Marks a test that installs the repository into a fresh venv (the integration tier)."""


@pytest.fixture()
def autoscaler() -> None:
    """Marks a test that runs Ray's autoscaler (the e2e tier)."""


@pytest.fixture(scope="session")
def gloo_ranks() -> None:
    """Marks a test that runs ranks of a torch.distributed group as processes (the integration tier)."""


@pytest.fixture()
def torch_compile() -> None:
    """Marks a test that compiles with inductor (the integration tier)."""


@pytest.fixture()
def ray_local() -> None:
    """Marks a test that starts a Ray of its own (the integration tier)."""


@pytest.fixture()
def cluster_scripts() -> None:
    """Marks a test that runs cluster/local's scripts (the e2e tier)."""


# -- the fast tier's pool: real Worker threads over the real store, no Ray ----------------------------------
@pytest.fixture(scope="session")
def test_settings(tiny_checkpoint):
    """The fast tier's settings: the session's SQLite store, no Ray."""
    from mochi_lab.config import Settings

    return Settings.from_env(namespace="mochi_test", lease_s=4.0, worker_ttl_s=6.0, persistent=False)


@pytest.fixture(scope="session")
def mochi(test_settings):
    """The session's MochiCluster for everything above the pool: a DirectBackend over SQLite whose pool is
    two real Worker loops in threads (tests/support/burst.py)."""
    from mochi_lab import MochiCluster
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.store import open_store
    from tests.support.burst import ThreadPool

    pool = ThreadPool(test_settings, n=2)
    backend = DirectBackend(test_settings, open_store(test_settings.store_url), pool)
    pool.ensure()
    cluster = MochiCluster(backend=backend)
    cluster.wait_ready(timeout=600)
    yield cluster
    cluster.shutdown_pool()
    cluster.close()


# -- the integration tier's pool: a multi-node Ray on one machine ------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster(tiny_checkpoint):
    """A real multi-node Ray on one machine: a CPU head and two nodes with 2 logical GPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 200 * 2**20,
            # notice a dead node in ~2 s instead of ~30 s
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                               "health_check_initial_delay_ms": 0},
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_settings(ray_cluster):
    from mochi_lab.config import Settings

    # a store of its own: the cheap pool's thread workers, if the same session has them, never claim its jobs
    return Settings.from_env(ray_address=ray_cluster.address, namespace="mochi_ray_test", lease_s=4.0,
                             worker_ttl_s=6.0, data_dir=_SESSION_HOME / "ray-data")


@pytest.fixture(scope="session")
def ray_mochi(ray_settings):
    """A MochiCluster on the multi-node Ray: SQLite store, one warm Ray actor per logical GPU (4)."""
    from mochi_lab import MochiCluster

    cluster = MochiCluster(settings=ray_settings)
    cluster.wait_ready(timeout=600)
    yield cluster
    cluster.shutdown_pool()
    cluster.close()


@pytest.fixture()
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture()
def hold():
    """hold(prompt, stage="denoising", step=1) -> Gate: jobs with that prompt wait there; all released
    when the test ends (a failed test leaves no worker stuck)."""
    from tests.support.gate import Gate

    gates: list[Gate] = []

    def make(prompt: str, stage: str = "denoising", step: int | None = 1) -> Gate:
        gates.append(Gate(prompt, stage, step))
        return gates[-1]

    yield make
    for gate in gates:
        gate.release()


def _stop_runtimes() -> list[int]:
    """Stop every local-runtime daemon serving a data dir under RUNTIMES (one mid-start too); their pids."""
    import psutil

    from mochi_lab.pool import runtime

    stopped = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "mochi_lab.pool.runtime" in cmd and cmd[-1].startswith(str(RUNTIMES)):
            if runtime.stop(Path(cmd[-1]), timeout=60) is None:  # no record yet: killed, the reaper ends its Ray
                proc.kill()
            stopped.append(proc.pid)
    return stopped


@pytest.fixture(scope="session")
def runtimes_root() -> Path:
    """Where tests put the data dirs of persistent local runtimes (the session stops them all at its end)."""
    return RUNTIMES


@pytest.fixture(scope="session", autouse=True)
def _no_runtime_left_behind():
    """A leaked Ray head would slow every later test (and outlive CI's session): stop what the tests started."""
    yield
    left = _stop_runtimes()
    if left:
        print(f"\nstopped {len(left)} local runtime(s) the tests left running: pids {left}")
