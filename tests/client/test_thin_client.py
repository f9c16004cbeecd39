"""`pip install mochi_lab` is the thin client: what a notebook or a script needs to talk to a gateway, and none of
torch, diffusers, transformers, Ray, FastAPI or uvicorn; what runs jobs, serves them or draws them comes with an
extra (pyproject.toml).

The fast checks read pyproject and the source: the extras' layout, and that the modules a thin client loads
import (at module level) only its own dependencies. The e2e checks install a copy of the repository into a fresh
venv from the package index (`pip install .`, then `.[notebook]`, as the JupyterHub image does), and drive the
session's real gateway and its workers (run from this full environment) with that venv's python: Studio,
History, ClusterPanel, `job.video` and an experiment, and the timing of benchmarks/thin_client.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from tests.support.imports import GRAPH, MODULES, SOURCES, imports
from tests.support.jobkit import TINY
from tests.support.venvs import HEAVY, REPO, clean_env, clone, make_venv, pip_list, run
from tests.support.widget_helpers import unique

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
SELF = "mochi-lab"


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def requirements(*extras: str) -> list[Requirement]:
    """The requirements of the core and `extras`, with the project's own extras (`mochi_lab[worker]`) expanded."""
    out, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in EXTRAS[extra]:
            req = Requirement(line)
            if _name(line) == SELF:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


# -- the layout -------------------------------------------------------------------------------------------
def test_the_thin_install_and_the_notebook_extra_name_no_heavy_package():
    for extras in ((), ("notebook",)):
        names = {_name(str(r)) for r in requirements(*extras)}
        assert not names & set(HEAVY), (extras, sorted(names & set(HEAVY)))
    assert {_name(r) for r in PROJECT["dependencies"]} == {"pydantic", "httpx", "jinja2", "tqdm", "pyyaml"}


def test_the_extras_that_run_jobs_or_serve_them_bring_them():
    def names(*extras: str) -> set[str]:
        return {_name(str(r)) for r in requirements(*extras)}

    assert {"ray", "diffusers", "transformers", "torch", "psutil", "redis", "av"} <= names("cpu")  # embedded default
    assert {"ray", "diffusers", "torch", "nvidia-ml-py"} <= names("gpu")
    assert "peft" in names("cpu") & names("gpu") & names("test")  # LoRA adapters: workers load them, tests make them
    assert {"ray", "fastapi", "uvicorn", "redis", "prometheus-client"} <= names("gateway")
    assert "torch" not in names("gateway") and "torch" not in names("worker")  # torch: `cpu` or `gpu` chooses
    assert {"ipywidgets", "ipykernel", "pandas", "pillow"} <= names("notebook")
    assert names("gateway") <= names("test")  # the tests start real gateways
    # README's first command installs these three, and they hold the full environment the tests run in
    assert names("cpu") | names("notebook") | names("gateway") <= names("cpu", "notebook", "test")


def test_torch_is_the_cpu_wheels_pin_except_on_gpu_images_and_ray_is_the_images_pin():
    images = dict(line.split("=", 1) for line in (REPO / "cluster" / "images.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    for extra in EXTRAS:
        for req in requirements(extra):
            if _name(str(req)) == "torch":
                # an unpinned torch pulls a multi-GB CUDA build: only the GPU images, whose index gives CUDA torch
                assert str(req.specifier) == "==2.13.0" or extra == "gpu", (extra, str(req))
            if _name(str(req)) == "ray":
                assert str(req.specifier) == f"=={images['RAY_VERSION']}", (extra, str(req))


def _third_party_at_import(roots: list[str]) -> dict[str, set[str]]:
    """Third-party top-level modules imported when `roots` are imported (module-level imports, followed through
    the package's own modules), each with the modules that import it."""
    seen, todo, found = set(), list(roots), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [t for t, edges in GRAPH[name].items() if any(not (e.lazy or e.typing) for e in edges)]
        for edge in imports(name, SOURCES[name], is_package=MODULES[name].name == "__init__.py"):
            top = edge.target.split(".")[0]
            if not (edge.lazy or edge.typing) and top != "mochi_lab" and top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(name)
    return found


@pytest.mark.parametrize("extras, roots", [
    # display.live: a job shown or waited on with progress, in a thin client too
    ((), ["", "client", "client.cluster", "client.http", "client.job", "client.experiment", "display.live", "cli",
          "extras"]),
    (("notebook",), ["display.widgets", "display.reprs", "display.experiment"]),
], ids=["client", "notebook"])
def test_what_a_thin_client_loads_imports_only_its_own_dependencies(extras, roots):
    """A heavy import at the top of a module the client loads breaks the thin install: it belongs inside the
    function that needs it (or in the worker, pool or gateway)."""
    allowed = {_name(str(r)) for r in requirements(*extras)}
    dists = packages_distributions()
    for top, where in sorted(_third_party_at_import(roots).items()):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(top, [top])}
        assert names & allowed, f"{sorted(where)} import {top} ({sorted(names)}), not in {extras or 'the core'}"


def test_without_ray_the_embedded_default_names_the_extra_and_the_gateway(monkeypatch):
    from mochi_lab import MochiCluster
    from mochi_lab.extras import MissingExtra

    monkeypatch.delenv("MOCHI_LAB_GATEWAY", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: find_spec answers None, import raises
    with pytest.raises(MissingExtra, match=r"needs ray, not installed here: pip install 'mochi_lab\[cpu\]', or talk "
                                           r"to a gateway: MochiCluster\('https://<gateway>/'\) or MOCHI_LAB_GATEWAY"):
        MochiCluster()
    assert issubclass(MissingExtra, ImportError)  # code that catches ImportError for optional features still does


@pytest.mark.parametrize("argv, missing, said", [
    (["gateway"], "fastapi", "mochi-lab gateway needs fastapi, not installed here: pip install 'mochi_lab[gateway]'"),
    (["status"], "psutil", "the local runtime (mochi-lab up, status, down) needs psutil, not installed here: "
                           "pip install 'mochi_lab[cpu]'"),
    (["experiment", "run", "no-such-spec.yaml", "--wait"], "pandas", "mochi-lab experiment --wait (its table of runs) needs "
     "pandas, not installed here: pip install 'mochi_lab[notebook]' (or pip install pandas)"),
], ids=["gateway", "status", "experiment-wait"])
def test_a_missing_extra_is_one_clear_line_from_the_cli(argv, missing, said, monkeypatch, capsys):
    from mochi_lab.cli import main

    monkeypatch.setitem(sys.modules, missing, None)
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == f"mochi-lab: MissingExtra: {said}"


# -- a real thin venv against a real gateway ----------------------------------------------------------------
@pytest.fixture(scope="module")
def thin(tmp_path_factory) -> dict:
    """A fresh venv (no system site-packages) with `pip install .`, then `.[notebook]`, from the package index;
    pip's wheel cache keeps a second run quick. Its python, and `pip list` after each install."""
    root = tmp_path_factory.mktemp("thin")
    src = clone(root / "clone")
    env = {k: v for k, v in clean_env().items() if k not in ("PIP_NO_INDEX", "PIP_NO_CACHE_DIR")}
    python = make_venv(root / "venv", env)
    lists = {}
    for extra in ("", "notebook"):
        run([python, "-m", "pip", "install", "-q", f"{src}[{extra}]" if extra else src], env, timeout=1500)
        lists[extra or "plain"] = pip_list(python, env)
    return {"python": python, "env": env, "lists": lists}


@pytest.mark.usefixtures("package_install")
def test_a_thin_install_lists_none_of_the_heavy_packages(thin):
    for install, listed in thin["lists"].items():
        assert "mochi-lab" in listed, install
        assert not set(HEAVY) & set(listed), (install, sorted(set(HEAVY) & set(listed)))
    assert {"ipywidgets", "pandas"} <= set(thin["lists"]["notebook"]) and "ipywidgets" not in thin["lists"]["plain"]


# Run by the thin venv's python, as a notebook on the hub would (MOCHI_LAB_GATEWAY and JUPYTERHUB_API_TOKEN set):
# asserts what it can see itself and prints what the test checks against the server side.
CLIENT = """
import json, sys
from pathlib import Path

from mochi_lab import ClusterPanel, History, MochiCluster, Studio

out, word, tiny = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
cluster = MochiCluster()
assert type(cluster.backend).__name__ == "GatewayBackend", cluster

studio = Studio(cluster, prompt=f"{word} a red kite", download_dir=out / "videos", seed=3, **tiny)
job = studio.submit()
assert job is not None, (studio.error.value, {k: v.value for k, v in studio.field_errors.items() if v.value})
job.result(timeout=600)
video = job.video
assert video.format == "mp4"
(out / "studio.mp4").write_bytes(video.value)

history = History(cluster, text=word)
rows = [r for r in history.rows if hasattr(r, "play_button")]
assert [r.job.id for r in rows] == [job.id], [r.job.id for r in rows]
rows[0].play_button.click()
assert history.player.children[1].value == video.value
frame = history.dataframe()

panel = ClusterPanel(cluster)

exp = cluster.experiment(f"{word}-sweep")
runs = exp.sweep(f"{word} a blue boat", seeds=[1, 2], **tiny)
counts = exp.wait(timeout=600, progress=False)
table = exp.to_dataframe()

heavy = ("torch", "diffusers", "transformers", "ray", "fastapi", "uvicorn", "av", "redis")
print(json.dumps({
    "job": job.id, "account": cluster.account, "history_ids": list(frame["id"]),
    "panel_workers": [r["worker_id"] for r in panel.rows], "panel_table": panel.table.value,
    "panel_counts": panel.counts.value, "runs": sorted(j.id for j in runs), "counts": counts,
    "table_status": sorted(table["status"]), "loaded": sorted(m for m in heavy if m in sys.modules),
}))
"""


@pytest.mark.usefixtures("package_install")
def test_a_thin_client_drives_the_widgets_a_video_and_an_experiment_through_a_real_gateway(
        thin, gateway, tokens, mochi, tmp_path):
    from mochi_lab import MochiCluster
    from mochi_lab.video import probe

    word = unique("thin")
    env = {**thin["env"], "MOCHI_LAB_GATEWAY": gateway.url, "JUPYTERHUB_API_TOKEN": tokens["wendy"],
           "MOCHI_LAB_CACHE_DIR": str(tmp_path / "cache")}
    seen = json.loads(run([thin["python"], "-c", CLIENT, tmp_path, word, json.dumps(TINY)], env,
                          timeout=900).strip().splitlines()[-1])
    assert seen["loaded"] == [] and seen["account"] == "wendy"
    # the video the thin client got is the job's, and it decodes
    as_wendy = MochiCluster(backend=mochi.backend.for_account("wendy"))  # the server's side of the same store
    assert as_wendy.job(seen["job"]).status == "done"
    assert (tmp_path / "studio.mp4").read_bytes() == as_wendy.job(seen["job"]).save(tmp_path / "server").read_bytes()
    info = probe(tmp_path / "studio.mp4")
    assert (info.frames, info.width, info.height) == (TINY["num_frames"], TINY["width"], TINY["height"])
    assert seen["history_ids"] == [seen["job"]]
    # the panel read the pool the gateway serves
    workers = sorted(w["worker_id"] for w in mochi.workers())
    assert sorted(seen["panel_workers"]) == workers and all(w in seen["panel_table"] for w in workers)
    assert "done <b>" in seen["panel_counts"]
    # the experiment's two runs ran on that pool
    assert seen["counts"]["done"] == 2 and seen["table_status"] == ["done", "done"]
    assert [as_wendy.job(i).status for i in seen["runs"]] == ["done", "done"]


@pytest.mark.usefixtures("package_install")
def test_the_benchmark_times_import_and_connect_in_the_thin_venv_against_a_real_gateway(thin, gateway, tokens):
    env = {**clean_env(), "JUPYTERHUB_API_TOKEN": tokens["wendy"]}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "thin_client.py"), "connect", "--python",
                          str(thin["python"]), "--gateway", gateway.url, "--runs", "3"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print("thin client:", row)  # the figures (-s shows them): benchmarks/README.md keeps the latest
    assert row["account"] == "wendy" and row["runs"] == 3
    assert 0 < row["import_s"] < row["total_s"] and 0 < row["connect_s"]
    assert not set(row["imported"]) & set(HEAVY), row["imported"]
    assert {"httpx", "pydantic"} <= set(row["imported"])  # it measured the real client, which talks HTTP
    assert Path(row["python"]) == Path(thin["python"])
