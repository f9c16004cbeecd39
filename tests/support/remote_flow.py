"""The notebook handle flow on a real gateway, as one function of (url, alice's token, bob's token).

tests/test_remote.py runs it on a gateway with static tokens over the session's pool; a hub-backed gateway
(tests/hub_fixtures.py: `gateway`, `tokens`) runs it the same way:

    def test_the_client_on_the_hub_gateway(gateway, tokens, tmp_path, monkeypatch):
        from tests.support.remote_flow import handle_flow
        handle_flow(gateway.url, tokens["alice"], tokens["bob"], tmp_path, monkeypatch)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mochi_lab import JobNotFound, MochiCluster
from mochi_lab.remote import GatewayBackend

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}


def handle_flow(gateway_url: str, alice_token: str, bob_token: str, tmp_path: Path, monkeypatch) -> None:
    """Bob's notebook: only JUPYTERHUB_API_TOKEN; claiming to be alice (env or account=) changes nothing."""
    import uuid

    import ipywidgets

    from mochi_lab.video import read_frames

    monkeypatch.delenv("MOCHI_LAB_GATEWAY", raising=False)
    monkeypatch.setenv("MOCHI_LAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", bob_token)
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    theirs = MochiCluster(backend=GatewayBackend(gateway_url, alice_token, cache_dir=tmp_path / "alice"))
    alices = theirs.generate("alice's fox", seed=11, **TINY)
    with MochiCluster(gateway_url, account="alice") as cluster:
        assert cluster.account == "bob" and "gateway" in repr(cluster) and bob_token not in repr(cluster)
        job = cluster.generate("a red fox in the snow", seed=7, **TINY)
        path = job.result(timeout=300)
        assert path.is_file() and path.is_relative_to(tmp_path / "cache")
        frames = read_frames(path)
        assert frames.shape[:3] == (7, 32, 32)
        video = job.video
        assert isinstance(video, ipywidgets.Video) and video.value == path.read_bytes()
        assert job.thumbnail[:8] == b"\x89PNG\r\n\x1a\n"
        assert job.id in [j.id for j in cluster.jobs()]
        assert all(j.record.account == "bob" for j in cluster.jobs())
        with pytest.raises(JobNotFound):
            cluster.job(alices.id)
        with pytest.raises(JobNotFound):
            cluster.backend.artifact(alices.id, "video")
        exp = cluster.experiment(f"sweep-{uuid.uuid4().hex[:8]}")
        runs = exp.sweep(["a fox", "a dog"], seeds=[3], **TINY)
        assert len(runs) == 2
        assert exp.wait(300, progress=False)["done"] == 2
        df = exp.to_dataframe()
        assert len(df) == 2 and list(df["status"]) == ["done", "done"]
    monkeypatch.setenv("MOCHI_LAB_GATEWAY", gateway_url)
    with MochiCluster() as again:
        assert again.account == "bob" and again.job(job.id).status == "done"
        assert again.job(job.id).result() == path  # the cache: same file, no second download
    assert theirs.job(alices.id).wait(300).status == "done"
    theirs.close()
