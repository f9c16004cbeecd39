"""Rich reprs of the handle and of jobs, from state already in memory (no store reads, no file reads).

Templates live in mochi_lab/templates. A finished job also offers an ipywidgets Video (the only
file read here, and only when a front end asks for the rich bundle): the bytes go to the browser
over the widget comm, so the notebook file keeps just the HTML summary and a widget reference.
"""

from __future__ import annotations

import html
import weakref
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mochi_lab.client import MochiCluster
    from mochi_lab.job import Job
    from mochi_lab.store import JobRecord

STATUS_COLOURS = {"queued": "#6c757d", "running": "#0d6efd", "done": "#198754", "failed": "#dc3545",
                  "cancelled": "#b8860b"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MIN_VIDEO_PX = 256  # test videos are 32 px wide: scale them up so they can be seen

# One widget per Job object: re-displaying a job must not read and send the MP4 again.
_widgets: "weakref.WeakKeyDictionary[Job, Any]" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=None)
def _template(name: str) -> Template:
    return Template(resources.files("mochi_lab").joinpath("templates", name).read_text())


def status_badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6c757d")
    return (f'<span style="background:{colour};color:white;border-radius:3px;padding:0 5px;font-size:11px">'
            f"{html.escape(status)}</span>")


def job_html(r: "JobRecord") -> str:
    p = r.params
    total = r.total_steps or int(p.get("num_inference_steps") or 0)
    bar = ""
    if r.status == "running" and total:
        bar = (f'<progress value="{min(r.step, total)}" max="{total}" style="width:120px;height:10px"></progress>'
               f" {r.step}/{total}")
    t = r.timings
    timings = ""
    if "run_s" in t:
        stages = ("queue_s", "load_s", "denoise_s", "decode_s", "encode_s", "run_s")
        parts = [f"{k[:-2]} {t[k]:.2f}s" for k in stages if k in t]
        timings = f'<br><span style="color:#888">{" &middot; ".join(parts)}</span>'
    worker = r.meta.get("worker_id") or r.worker_id
    video = Path(r.artifacts["video"]).name if r.artifacts.get("video") else ""
    error = ""
    if r.error:
        error = f'<div style="color:#dc3545;white-space:pre-wrap">{html.escape(r.error)}</div>'
        if r.traceback:
            error += f"<details><summary>traceback</summary><pre>{html.escape(r.traceback)}</pre></details>"
    negative = ""
    if p.get("negative_prompt"):
        negative = f' <span style="color:#888">(not: {html.escape(str(p["negative_prompt"]))})</span>'
    return _template("job.html").substitute(
        id=html.escape(r.id),
        badge=status_badge(r.status),
        stage=html.escape(r.stage if r.stage != r.status else ""),
        bar=bar,
        prompt=html.escape(str(p.get("prompt", ""))),
        negative=negative,
        size=(f"{p.get('width')}x{p.get('height')} &middot; {p.get('num_frames')} frames &middot; "
              f"{p.get('num_inference_steps')} steps"),
        seed=html.escape(str(p.get("seed"))),
        guidance=html.escape(str(p.get("guidance_scale"))),
        fps=html.escape(str(p.get("fps"))),
        model=html.escape(str(p.get("model"))),
        where=f" &middot; {html.escape(str(worker))}" if worker else "",
        timings=timings,
        video=f'<br><span style="color:#888">&#9654; {html.escape(video)}</span>' if video else "",
        error=error,
    )


def job_mimebundle(job: "Job") -> dict[str, Any]:
    """text/plain and text/html always; for a done job, also a widget showing the summary and the video."""
    bundle: dict[str, Any] = {"text/plain": repr(job), "text/html": job_html(job.record)}
    widget = job_widget(job)
    if widget is not None:
        # Only the widget reference: the widget's own text/plain would quote the MP4's first bytes.
        bundle[WIDGET_MIME] = widget._repr_mimebundle_()[WIDGET_MIME]
    return bundle


def job_widget(job: "Job"):
    """The summary and video of a done job as one widget, made once per Job object; None otherwise."""
    r = job.record
    if r.status != "done" or not r.artifacts.get("video"):
        return None
    widget = _widgets.get(job)
    if widget is None:
        widget = _video_widget(r)
        if widget is not None:
            _widgets[job] = widget
    return widget


def video_widget(r: "JobRecord"):
    """The job's MP4 as a looping ipywidgets Video, scaled up to at least MIN_VIDEO_PX wide. Reads the file."""
    import ipywidgets as W

    w, h = int(r.params.get("width") or MIN_VIDEO_PX), int(r.params.get("height") or MIN_VIDEO_PX)
    scale = max(1.0, MIN_VIDEO_PX / max(w, 1))
    return W.Video.from_file(r.artifacts["video"], autoplay=True, loop=True, controls=True,
                             width=str(int(w * scale)), height=str(int(h * scale)))


def _video_widget(r: "JobRecord"):
    import ipywidgets as W

    try:
        video = video_widget(r)
    except OSError:  # deleted since: the HTML summary still renders
        return None
    return W.VBox([W.HTML(job_html(r)), video])


def cluster_html(c: "MochiCluster") -> str:
    s = c.settings
    if s.redis_url:
        u = urlsplit(s.redis_url)  # never show a password from the URL
        store = f"redis {html.escape(u.hostname or '')}:{u.port or 6379}{html.escape(u.path)}"
    else:
        store = f"sqlite {html.escape(str(s.data_dir))}"
    return _template("cluster.html").substitute(
        ray=html.escape(str(c.ray_address)),
        namespace=html.escape(s.namespace),
        store=store,
        account=html.escape(c.account),
        model=html.escape(c.model),
        workers="one per GPU" if s.workers is None else str(s.workers),
    )
