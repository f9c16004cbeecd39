"""Rich reprs render from memory; a done job offers its video as a widget, never as bytes in text."""

from __future__ import annotations

from pathlib import Path

from widget_helpers import unique

from mochi_lab import Job
from mochi_lab.reprs import WIDGET_MIME


def test_cluster_repr_is_compact_html(mochi):
    out = mochi._repr_html_()
    assert "MochiCluster" in out and f"<b>{mochi.account}</b>" in out and "tiny" in out and len(out) < 1000
    if mochi.backend.info()["backend"] == "gateway":  # its URL; the store and Ray are the server's business
        assert f"gateway {mochi.backend.info()['address']}" in out and "store" not in out and "ray " not in out
    else:
        assert "sqlite" in out and "ray " in out


def test_job_reprs_need_no_store(mochi):
    prompt = unique("<script>alert(1)</script>")
    job = mochi.generate(prompt, num_frames=7, height=32, width=32, num_inference_steps=2, fps=8)
    queued_html = job._repr_html_()
    assert "&lt;script&gt;" in queued_html and "<script>" not in queued_html
    job.result(timeout=240)
    offline = Job(None, job.record)  # any backend read would raise AttributeError
    html = offline._repr_html_()
    assert "done" in html and "run " in html and Path(job.record.artifacts["video"]).name in html
    assert job.record.meta["worker_id"] in html


def test_done_job_bundle_has_a_video_widget_and_no_bytes(mochi):
    import ipywidgets as W
    from ipywidgets.widgets.widget import _instances

    job = mochi.generate(unique("a shell"), num_frames=7, height=32, width=32, num_inference_steps=2, fps=8)
    queued = job._repr_mimebundle_()
    assert WIDGET_MIME not in queued and set(queued) == {"text/plain", "text/html"}
    job.result(timeout=240)
    bundle = job._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html", WIDGET_MIME}
    box = _instances[bundle[WIDGET_MIME]["model_id"]]  # the live widget the front end will show
    summary, video = box.children
    assert isinstance(video, W.Video) and "done" in summary.value
    assert video.value == Path(job.result()).read_bytes() and video.width == "256"
    assert "ftyp" not in bundle["text/plain"] and "ftyp" not in bundle["text/html"]
    assert job._repr_mimebundle_()[WIDGET_MIME] == bundle[WIDGET_MIME]  # displayed twice, sent once
