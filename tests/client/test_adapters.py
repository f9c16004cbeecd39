"""`cluster.adapters` and `lora=` on the session's handle (the direct backend and its thread workers): a .bin
file is refused before any upload, the result cache goes by the adapter file's content, and an experiment sweeps
adapters and scales and is read by them (its DataFrame's columns, its compare grid's labels, the History's
DataFrame)."""

from __future__ import annotations

import pickle
import uuid

import pytest

from mochi_lab.adapters import AdapterRejected
from mochi_lab.display.widgets import jobs_frame
from tests.support.backends import unique
from tests.support.jobkit import TINY
from tests.support.lora import make_adapter


def _name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("lora") / "style.safetensors", seed=3)


def test_the_direct_handle_refuses_a_bin_file_and_keys_the_cache_by_the_files_content(mochi, adapter_path, tmp_path):
    bin_file = tmp_path / "weights.bin"
    bin_file.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(AdapterRejected, match=r"weights.bin: only .safetensors adapters are accepted"):
        mochi.adapters.upload(bin_file)
    name = _name("swap")
    first = mochi.adapters.upload(adapter_path, name=name)
    prompt = unique("a swapped cat")
    job = mochi.generate(prompt, seed=4, lora=name, **TINY)
    assert mochi.generate(prompt, seed=4, lora=name, **TINY).id == job.id
    assert job.wait(300).status == "done"  # (a job queued with a file that is replaced before it runs fails)
    other = make_adapter(tmp_path / "other.safetensors", seed=9)
    second = mochi.adapters.upload(other, name=name)  # the same name, another file: another video
    assert second["sha256"] != first["sha256"]
    again = mochi.generate(prompt, seed=4, lora=name, **TINY)
    assert again.id != job.id and again.record.params["lora"][0]["sha256"] == second["sha256"]
    assert again.wait(300).status == "done" and again.result().read_bytes() != job.result().read_bytes()
    mochi.adapters.delete(name)


def test_an_experiment_sweeps_adapters_and_scales_and_is_read_by_them(mochi, adapter_path, tmp_path):
    name = _name("sweep")
    mochi.adapters.upload(adapter_path, name=name)
    exp = mochi.experiment(_name("lora-sweep"))
    runs = exp.sweep(unique("a swept cat"), seeds=[1], lora=[None, name], lora_scale=[0.5, 1.0], **TINY)
    assert len(runs) == 3  # the base run once: it has no adapter to scale
    assert exp.wait(300, progress=False)["done"] == 3
    df = exp.to_dataframe()
    assert list(df.columns[:2]) == ["lora", "lora_scale"]
    assert sorted(df["lora_scale"].dropna().tolist()) == [0.5, 1.0] and df["lora"].dropna().unique().tolist() == [name]
    history = jobs_frame(mochi.jobs(experiment=exp.name))  # the History's DataFrame, by adapter and scale too
    assert sorted(history["lora_scale"].dropna().tolist()) == [0.5, 1.0]
    grid = exp.compare(download_dir=tmp_path)
    assert sorted(grid.col_labels) == sorted(["none", f"{name} \u00d70.5", f"{name} \u00d71"])
    mochi.adapters.delete(name)
