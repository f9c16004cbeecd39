"""The local runtime serves any model it knows, on demand: a handle asking for another model than the runtime's
attaches, a worker loads that model for its job and goes back to the runtime's own while idle. Only what
belongs to the running workers is refused: another store, namespace or pipeline, or a model the runtime was
not started with (or knows as another checkpoint), each with what is loaded and how to change it.

The handles are real processes (`python -c`) so that this process never joins the runtime's Ray; the runtime
is a real daemon with a real Ray head on 127.0.0.1, its data dir under `runtimes_root`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from mochi_lab.cli import main
from mochi_lab.config import Settings
from mochi_lab.pipelines.config import PipelineConfig
from mochi_lab.pool import runtime
from mochi_lab.store import open_store

# the runtime was started for "tiny"; this handle asks for "tiny-copy", a model the runtime knows too
HANDLE = """
import contextlib, io, json, os, sys, time
from mochi_lab import MochiCluster
from mochi_lab.cli import main
from mochi_lab.pool.runtime import RuntimeMismatch
from mochi_lab.config import Settings

tiny, redis_url = json.loads(sys.argv[1]), sys.argv[2]

def refusal(model="tiny", **settings):
    try:
        MochiCluster(model=model, settings=Settings.from_env(**settings)).close()
    except RuntimeMismatch as exc:
        return str(exc)
    return None

models = os.environ["MOCHI_LAB_MODELS"]
os.environ["MOCHI_LAB_MODELS"] = json.dumps({**json.loads(models), "tiny-late": json.loads(models)["tiny-copy"]})
late = refusal("tiny-late")  # registered here, after the runtime started
os.environ["MOCHI_LAB_MODELS"] = models
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    up = main(["up", "--model", "tiny-copy", "--json"])
print(json.dumps({"namespace": refusal(namespace="elsewhere"), "store": refusal(redis_url=redis_url),
                  "late": late, "up": [up, json.loads(out.getvalue())["model"], err.getvalue()]}), flush=True)

c = MochiCluster(model="tiny-copy")
other = c.generate("another model, held", seed=4, force=True, **tiny)
print(json.dumps({"job": other.id, "address": c.backend.ray_address}), flush=True)
other.result(300)

deadline = time.monotonic() + 300
while not any(w["model"] == "tiny" and w["state"] == "idle" for w in c.backend.store.workers()):
    assert time.monotonic() < deadline, c.backend.store.workers()
    time.sleep(0.05)
home = c.generate("the runtime's own model", model="tiny", seed=5, force=True, **tiny)
home.result(300)
print(json.dumps({"other": {"model": other.record.meta["model"], "source": other.record.meta["model_source"],
                            "load_s": other.timings["load_s"]},
                  "home": {"model": home.record.meta["model"], "load_s": home.timings["load_s"]}}), flush=True)
"""

FIRST = """
from mochi_lab import MochiCluster
with MochiCluster() as c:
    c.wait_ready(300)
"""


@pytest.fixture
def home(runtimes_root, tiny_checkpoint, monkeypatch):
    """A data dir of its own, the persistent runtime on, and a second tiny model ("tiny-copy") registered."""
    data = runtimes_root / uuid.uuid4().hex[:8]
    data.mkdir(parents=True)
    models = {**json.loads(os.environ.get("MOCHI_LAB_MODELS") or "{}"), "tiny-copy": str(tiny_checkpoint)}
    for var, value in {"MOCHI_LAB_DATA_DIR": str(data), "MOCHI_LAB_PERSISTENT": "1", "MOCHI_LAB_WORKERS": "1",
                       "MOCHI_LAB_RUNTIME_IDLE_S": "600", "MOCHI_LAB_MODELS": json.dumps(models)}.items():
        monkeypatch.setenv(var, value)
    yield data
    runtime.stop(data, timeout=60)


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy(), start_new_session=True)


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait(60)
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.read()[-3000:]}")
    return json.loads(line)


@pytest.mark.usefixtures("ray_local")
def test_a_runtime_serves_another_known_model_on_demand_and_refuses_another_store_or_namespace(
        home, tiny, tiny_checkpoint, redis_url, hold, capsys):
    first = _python(FIRST)
    assert first.wait(300) == 0, first.stderr.read()[-3000:]
    record = runtime.live_record(home)
    assert record is not None and record["model"] == "tiny" and record["models"]["tiny-copy"] == str(tiny_checkpoint)

    gate = hold("another model, held")
    handle = _python(HANDLE, json.dumps(tiny), redis_url)
    try:
        refused = _line(handle)
        where = f"the local runtime at {record['address']} (pid {record['pid']})"
        assert refused["namespace"].startswith(f"{where} runs its pool in namespace 'mochi_lab', not 'elsewhere'")
        assert refused["store"].startswith(f"{where} uses the store {record['store']}, not {redis_url}")
        assert refused["late"].startswith(f"{where} serves model 'tiny' (1 worker(s)), not 'tiny-late'")
        up = refused.pop("up")  # `mochi-lab up` for another model attaches, and says when that model loads
        assert up[:2] == [0, "tiny"]
        assert "the local runtime keeps tiny warm; tiny-copy loads with its first job" in up[2]
        for message in refused.values():
            assert "mochi-lab down" in message and "persistent=False" in message

        # attached, not refused: the runtime's worker loads tiny-copy for this handle's job
        running = _line(handle)
        assert running["address"] == record["address"]
        assert gate.wait_reached() == [running["job"]]
        rows = _workers(home)
        assert [(w["worker_id"], w["model"], w["state"], w["current_job"]) for w in rows] == \
            [("mochi-worker-0", "tiny-copy", "busy", running["job"])]
        # `mochi-lab status` shows the runtime's worker whichever model it has loaded
        assert main(["status", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert (shown["model"], shown["pid"]) == ("tiny", record["pid"])
        assert [(w["worker_id"], w["state"], w["current_job"]) for w in shown["worker_rows"]] == \
            [("mochi-worker-0", "busy", running["job"])]
        gate.release()

        done = _line(handle)
        assert handle.wait(60) == 0, handle.stderr.read()[-3000:]
    finally:
        if handle.poll() is None:
            handle.kill()
            handle.wait()
    assert done["other"]["model"] == "tiny-copy" and done["other"]["source"] == str(tiny_checkpoint)
    assert done["other"]["load_s"] > 0  # it waited for the load it caused
    # the worker went back to the runtime's model while idle: its own handles find it warm
    assert done["home"] == {"model": "tiny", "load_s": 0}
    after = runtime.live_record(home)
    assert (after["pid"], after["address"], after["model"]) == (record["pid"], record["address"], "tiny")


def _workers(data_dir) -> list[dict]:
    store = open_store(Settings(data_dir=data_dir).store_url)
    try:
        return store.workers()
    finally:
        store.close()


# -- the attach check alone (no runtime) -----------------------------------------------------------------------
@pytest.fixture
def record(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("MOCHI_LAB_MODELS", json.dumps({"tiny-copy": "/checkpoints/tiny-copy"}))
    return {"address": "127.0.0.1:1234", "pid": 1, "model": "tiny", "workers": 1, "namespace": "mochi_lab",
            "store": f"sqlite:///{tmp_path / 'store.sqlite3'}", "pipeline": PipelineConfig().model_dump(mode="json"),
            "models": {"tiny": "tiny", "mochi-1-preview": "genmo/mochi-1-preview",
                       "tiny-copy": "/checkpoints/tiny-copy"}}


def test_any_model_the_runtime_knows_is_joined(record, tmp_path):
    settings = Settings(data_dir=tmp_path)
    for model in ("tiny", "mochi-1-preview", "tiny-copy"):
        runtime.check_compatible(record, settings, model, PipelineConfig())


def test_a_model_the_runtime_does_not_know_or_knows_as_another_checkpoint_is_refused(record, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    monkeypatch.setenv("MOCHI_LAB_MODELS", json.dumps({"tiny-copy": "/checkpoints/tiny-copy", "tiny-late": "/late"}))
    with pytest.raises(runtime.RuntimeMismatch, match=r"serves model 'tiny' \(1 worker\(s\)\), not 'tiny-late': it "
                       r"loads on demand only the models it was started with \(mochi-1-preview, tiny, tiny-copy;"):
        runtime.check_compatible(record, settings, "tiny-late")
    monkeypatch.setenv("MOCHI_LAB_MODELS", json.dumps({"tiny-copy": "/checkpoints/retrained"}))
    with pytest.raises(runtime.RuntimeMismatch, match="knows model 'tiny-copy' as /checkpoints/tiny-copy, not "
                       "/checkpoints/retrained .MOCHI_LAB_MODELS differs.: stop it with `mochi-lab down`"):
        runtime.check_compatible(record, settings, "tiny-copy")


def test_another_store_namespace_or_pipeline_is_refused_with_how_to_change_it(record, tmp_path):
    settings = Settings(data_dir=tmp_path)
    how = r"stop it with `mochi-lab down` .*persistent=False"
    with pytest.raises(runtime.RuntimeMismatch, match=f"uses the store sqlite:///elsewhere, not .*: {how}"):
        runtime.check_compatible({**record, "store": "sqlite:///elsewhere"}, settings, "tiny-copy")
    with pytest.raises(runtime.RuntimeMismatch, match=f"namespace 'other', not 'mochi_lab': {how}"):
        runtime.check_compatible({**record, "namespace": "other"}, settings, "mochi-1-preview")
    with pytest.raises(runtime.RuntimeMismatch, match=f"'cpu_offload': False.*not .*'cpu_offload': True.*: {how}"):
        runtime.check_compatible(record, settings, "tiny", PipelineConfig(cpu_offload=True))


def test_a_runtime_that_predates_on_demand_models_is_joined_for_its_own_model_only(record, tmp_path):
    settings = Settings(data_dir=tmp_path)
    del record["models"]
    runtime.check_compatible(record, settings, "tiny")
    with pytest.raises(runtime.RuntimeMismatch, match=r"not 'tiny-copy': it loads on demand only .*\(tiny;"):
        runtime.check_compatible(record, settings, "tiny-copy")
