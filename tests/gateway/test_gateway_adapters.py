"""LoRA adapters through the real hub and gateway: a hub user uploads
an adapter and generates with it; another user's every request for it answers as for an unknown one (404, or
422 naming the `lora` field at generate); a refused upload is a 4xx naming why, with nothing kept. (Both backends'
shared ways are in tests/client/backend's contract suite.)"""

from __future__ import annotations

import pickle
import uuid

import pytest

from mochi_lab.adapters import AdapterNotFound
from mochi_lab.params import ParamsError
from tests.support.backends import unique
from tests.support.jobkit import TINY
from tests.support.lora import lie, make_adapter


def _name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("lora") / "style.safetensors", seed=3)


def test_a_hub_user_uploads_and_uses_an_adapter_and_another_user_gets_404(gateway, tokens, adapter_path, tmp_path):
    from mochi_lab import MochiCluster
    from mochi_lab.client.http import GatewayBackend

    name = _name("style")
    alice = MochiCluster(backend=GatewayBackend(gateway.url, tokens["alice"], cache_dir=tmp_path / "a"))
    bob = MochiCluster(backend=GatewayBackend(gateway.url, tokens["bob"], cache_dir=tmp_path / "b"))
    try:
        record = alice.adapters.upload(adapter_path, name=name)
        assert record["name"] == name and record["model"] == "tiny" and record["rank"] == 4
        assert name in [r["name"] for r in alice.adapters.list()]
        prompt = unique("a styled cat")
        job = alice.generate(prompt, seed=2, lora=[(name, 0.8)], **TINY)
        base = alice.generate(prompt, seed=2, **TINY)
        assert job.wait(300).status == "done" and base.wait(300).status == "done"
        assert job.record.params["lora"] == [{"name": name, "scale": 0.8, "sha256": record["sha256"]}]
        assert job.record.meta["lora"][0]["sha256"] == record["sha256"] and "lora_load_s" in job.record.meta
        assert job.result().read_bytes() != base.result().read_bytes()
        assert alice.generate(prompt, seed=2, lora=[(name, 0.8)], **TINY).id == job.id  # the result cache
        with gateway.client(tokens["alice"]) as c:  # the page lists the account's adapters, and a job's
            page = c.get("/", headers={"Accept": "text/html"}).text
            assert f'data-adapter="{name}"' in page and f'class="lora">{name} \u00d70.8</span>' in page
        with gateway.client(tokens["bob"]) as c:
            assert name not in c.get("/", headers={"Accept": "text/html"}).text

        assert name not in [r["name"] for r in bob.adapters.list()]
        with pytest.raises(ParamsError, match=f"lora: no adapter named '{name}' in account bob"):
            bob.generate(prompt, seed=2, lora=name, **TINY)
        with gateway.client(tokens["bob"]) as c:
            theirs, unknown = c.delete(f"/adapters/{name}"), c.delete(f"/adapters/{_name('none')}")
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json() == {"error": "not_found", "detail": f"adapter {name!r} not found"}
        with pytest.raises(AdapterNotFound):
            bob.adapters.delete(name)
        assert name in [r["name"] for r in alice.adapters.list()]  # untouched
        alice.adapters.delete(name)
        assert name not in [r["name"] for r in alice.adapters.list()]
    finally:
        alice.close()
        bob.close()


def test_a_refused_upload_through_the_gateway_is_422_naming_why_and_keeps_nothing(gateway, tokens, adapter_path):
    data = adapter_path.read_bytes()
    cases = {
        "a pickle": (pickle.dumps({"w": 1}, protocol=4), "is a pickle"),
        "truncated": (data[:-10], "past the end"),
        "a header that lies": (lie(data, shape=[2**31, 2**31]), "the header lies"),
    }
    with gateway.client(tokens["erin"]) as c:
        for case, (body, reason) in cases.items():
            r = c.put(f"/adapters/{_name('bad')}", content=body, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 422 and r.json()["error"] == "rejected", (case, r.text)
            assert reason in r.json()["detail"], (case, r.text)
        r = c.put("/adapters/..%5Cescape", content=data)
        assert r.status_code == 422 and "an adapter name is" in r.json()["detail"]
        assert c.get("/adapters").json() == []
