"""HTML for jobs, the cluster handle and the widgets: plain data in, escaped HTML out.

A leaf, with the modules it is built on (`display.values`, `display.progress`, `display.notes`): it imports
nothing else from mochi_lab, reads no store and no file. Records are taken by duck typing (a `JobRecord` or any
object or mapping with its field names), because the store is a trust boundary: any field may hold any JSON
value, markup included, so

* every view is a Jinja2 template in `mochi_lab/display/templates/` rendered with autoescaping ON, and no
  stored value is ever marked safe;
* records are first flattened into plain views here (`job_view`, `pool_view`) by helpers that never assume
  a type (`display.values`): a number where a number belongs is formatted, anything else is shown as text;
* colours are JupyterLab's CSS variables with fallbacks, so the views follow the theme.

The widgets in `mochi_lab.display.widgets` render their HTML through `render` with the templates here too.
A job's progress (`progress_view`) and the notes beside it (`RetryTracker`, `queue_note`, `stopped_note`,
`ordinal`) have their own modules, `display.progress` and `display.notes`; they still import from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mochi_lab.display.notes import RetryTracker, ordinal, queue_note, stopped_note
from mochi_lab.display.progress import progress_view
from mochi_lab.display.values import (
    adapters,
    basename,
    field,
    gib,
    is_number,
    mapping,
    num,
    seconds,
    short,
    strings,
    text,
    to_int,
    when,
)

if TYPE_CHECKING:
    from jinja2 import Environment

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# A live widget's static stand-in, for the notebook file: front ends render nothing for this type, and
# the save hook (mochi_lab.display.widgets.save_hook) turns it into text/html when the notebook is saved.
STATIC_MIME = "application/vnd.mochi-lab.static+html"
MIN_VIDEO_PX = 256  # test videos are 32 px wide: scale them up so they can be seen

# Theme colours (JupyterLab CSS variables), with fallbacks for front ends that do not define them.
MUTED = "var(--jp-ui-font-color2, #888)"
BORDER = "var(--jp-border-color2, #ccc)"
PLACEHOLDER = "var(--jp-layout-color2, #eee)"
SUCCESS = "var(--jp-success-color1, #198754)"
ERROR = "var(--jp-error-color1, #dc3545)"
BRAND = "var(--jp-brand-color1, #0d6efd)"
WARN = "var(--jp-warn-color1, #b8860b)"
STATUS_COLOURS = {"queued": MUTED, "running": BRAND, "done": SUCCESS, "failed": ERROR, "cancelled": WARN}
STATE_COLOURS = {"idle": SUCCESS, "busy": BRAND, "loading": WARN, "error": ERROR}
TIMING_STAGES = ("queue_s", "load_s", "denoise_s", "decode_s", "encode_s", "run_s")


def status_colour(status: Any) -> str:
    return STATUS_COLOURS.get(status, MUTED) if isinstance(status, str) else MUTED


def state_colour(state: Any) -> str:
    return STATE_COLOURS.get(state, MUTED) if isinstance(state, str) else MUTED


# -- templates -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _env() -> Environment:
    # Jinja2 is loaded at the first render: a script that imports this module (its constants, a record's plain
    # views) and never displays anything loads no template engine
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    # autoescape=True for every template whatever its name; StrictUndefined: a typo fails loudly in tests
    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, seconds=seconds, gib=gib, when=when, short=short, text=text)
    env.globals.update(MUTED=MUTED, BORDER=BORDER, PLACEHOLDER=PLACEHOLDER, ERROR=ERROR, WARN=WARN, BRAND=BRAND,
                       status_colour=status_colour, state_colour=state_colour)
    return env


def render(template: str, macro: str | None = None, /, **context: Any) -> str:
    """Render `template` (a file in mochi_lab/display/templates), or one of its macros, with autoescaping."""
    t = _env().get_template(template)
    if macro is None:
        return t.render(**context)
    return str(getattr(t.module, macro)(**context)).strip()


def status_badge(status: Any) -> str:
    return render("_macros.html", "badge", status=status)


def error_html(error: Any, traceback: Any = None) -> str:
    """An error in red, with the traceback folded away (it is long and rarely the first thing needed)."""
    return render("_macros.html", "error", error=error, traceback=traceback)


# -- views of a job --------------------------------------------------------------------------------
# Per-stage timings in the order a job goes through them, with their short labels; run_s is the total.
TIMING_LABELS = (("queue_s", "queue"), ("load_s", "load"), ("text_s", "text"), ("denoise_s", "denoise"),
                 ("decode_s", "decode"), ("encode_s", "encode"), ("run_s", "total"))


def timings_line(timings: Any) -> list[tuple[str, str]]:
    """The per-stage seconds a record holds, as (label, "1.2 s") pairs in stage order; nothing if none."""
    t = mapping(timings)
    return [(label, seconds(t[key])) for key, label in TIMING_LABELS if key in t and t[key] is not None]


def job_view(r: Any, *, notes: Any = (), media: Any = None, preview: Any = None) -> dict[str, Any]:
    """The display facts of a job record, each a plain value the templates escape (no type assumed).

    `notes`: lines about the job's life a record alone does not hold (a lost worker, the queue
    position); `media`: the finished job's thumbnail and video links (`media_view`); `preview`: the
    running job's latest preview (`preview_view`)."""
    p = mapping(field(r, "params"))
    timings = mapping(field(r, "timings"))
    meta = mapping(field(r, "meta"))
    artifacts = mapping(field(r, "artifacts"))
    status, stage = field(r, "status"), field(r, "stage")
    step, total_steps = field(r, "step"), field(r, "total_steps")
    total = to_int(total_steps) or to_int(p.get("num_inference_steps")) or 0
    if not is_number(total_steps) and total_steps not in (None, ""):
        total = total_steps  # a hostile total is shown, never used as a number
    attempts = field(r, "attempts")
    stopped = stopped_note(r)
    return {
        "id": field(r, "id"),
        "status": status,
        "stage": stage if stage != status else None,
        "step": step,
        "total": total,
        "running": status == "running",
        "denoising": status == "running" and stage == "denoising",
        "bar": progress_view(r),
        "prompt": p.get("prompt", ""),
        "negative_prompt": p.get("negative_prompt"),
        "width": p.get("width"), "height": p.get("height"), "num_frames": p.get("num_frames"),
        "steps": p.get("num_inference_steps"), "seed": p.get("seed"), "guidance": p.get("guidance_scale"),
        "fps": p.get("fps"), "model": p.get("model"),
        # the job's adapters by name and scale ("style ×0.8, grain ×0.3"); None for a job without any
        "lora": adapters(p.get("lora")),
        "worker": meta.get("worker_id") or field(r, "worker_id"),
        "timings": ([(k[:-2], timings[k]) for k in TIMING_STAGES if k in timings] if "run_s" in timings else []),
        "timing_line": timings_line(timings) if "run_s" in timings else [],
        "run_s": timings.get("run_s"),
        "video": basename(artifacts.get("video")) if artifacts.get("video") else None,
        "preview": preview if status != "done" else None,
        "error": field(r, "error"),
        "traceback": field(r, "traceback"),
        "experiment": field(r, "experiment"),
        "tags": strings(field(r, "tags")),
        "created_at": field(r, "created_at"),
        # shown only when it says something: a retried job, or a value that is not a count
        "attempts": attempts if (to_int(attempts, 0) > 1 or not (attempts is None or is_number(attempts)))
        else None,
        "notes": [*strings(list(notes) if isinstance(notes, (list, tuple)) else notes),
                  *([stopped] if stopped else [])],
        "media": media_view(media),
    }


def media_view(media: Any) -> dict[str, Any] | None:
    """A done job's media for the static view: `thumbnail` (a data: URI), `href` (a relative link to
    the saved MP4, percent-encoded), `name` (the file's name), `note` (why there is no link)."""
    m = mapping(media)
    if not m:
        return None
    thumb = m.get("thumbnail")
    href = m.get("href")
    return {
        # only the URIs this module builds reach a src attribute (nothing from the store)
        "thumbnail": thumb if isinstance(thumb, str) and thumb.startswith(_THUMB_PREFIXES) else None,
        "href": href if isinstance(href, str) and href.startswith("./") else None,
        "name": m.get("name"),
        "note": m.get("note"),
        "video": bool(m.get("video", True)),
    }


_THUMB_PREFIXES = ("data:image/jpeg;base64,", "data:image/png;base64,")
THUMB_PX = 160  # the static thumbnail's width: small enough to keep a saved notebook light


def thumbnail_uri(png: Any, width: int = THUMB_PX) -> str | None:
    """A thumbnail's bytes as a small JPEG data: URI (a few KB, so a saved notebook stays light);
    None for anything that is not an image."""
    if not isinstance(png, (bytes, bytearray)) or not png:
        return None
    import base64
    import io

    try:
        from PIL import Image

        with Image.open(io.BytesIO(bytes(png))) as im:
            im = im.convert("RGB")
            if im.width > width:
                im = im.resize((width, max(1, round(im.height * width / im.width))))
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=80)
    except Exception:  # not an image (a hostile or truncated artifact): no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def job_html(record: Any, *, notes: Any = (), media: Any = None, preview: Any = None) -> str:
    """The compact job summary (a `JobRecord` or a mapping of its fields)."""
    return render("job.html", r=job_view(record, notes=notes, media=media, preview=preview))


def preview_view(step: Any, webp: Any) -> dict[str, Any] | None:
    """A preview's (step, animated WebP bytes) as an image the templates can show: a data: URI we build
    from the bytes (base64 only), never a value read from the store as text."""
    if not isinstance(webp, (bytes, bytearray)) or not webp.startswith(b"RIFF"):
        return None
    import base64

    return {"src": "data:image/webp;base64," + base64.b64encode(bytes(webp)).decode(), "step": to_int(step)}


WORKER_STATES = (("idle", "ready"), ("busy", "busy"), ("loading", "loading"), ("error", "error"))


def pool_view(workers: Any) -> dict[str, Any] | None:
    """Worker rows (`MochiCluster.workers()`) as the repr's counts: how many, CPU or GPU (with the GPUs'
    names), how many ready (idle), busy, loading and in error, and the models loaded; None: not read."""
    if not isinstance(workers, (list, tuple)):
        return None
    rows = [mapping(w) for w in workers]
    gpus = sorted({text(r.get("gpu_name")) for r in rows if r.get("gpu_name")})
    on_gpu = sum(1 for r in rows if r.get("gpu_name") or r.get("device") == "cuda")
    states = {label: sum(1 for r in rows if r.get("state") == state) for state, label in WORKER_STATES}
    return {"n": len(rows), "kind": "GPU" if on_gpu == len(rows) and rows else "CPU" if not on_gpu else "mixed",
            "gpus": gpus, "states": [(label, n) for label, n in states.items() if n or label != "error"],
            "models": sorted({text(r.get("model")) for r in rows if r.get("model")})}


def cluster_html(info: Mapping[str, Any], *, workers: Any = None, queue: Any = None, dashboard: Any = None,
                 error: Any = None) -> str:
    """The handle at a glance, as dask's Client shows itself: account and model, the live workers (ready,
    busy, loading), the queue (every account's, and how many are this account's), the Ray dashboard's link,
    then where it runs (backend, address, store: password-free text). `workers` and `queue` are the rows
    `MochiCluster.workers()` and `.queue()` read (None: not read); `error` why they could not be."""
    info = mapping(info)
    keys = ("backend", "address", "store", "account", "model")
    rows = queue if isinstance(queue, (list, tuple)) else None
    q = None if rows is None else {"n": len(rows), "mine": sum(1 for r in rows if mapping(r).get("mine") is True)}
    href = dashboard if isinstance(dashboard, str) and dashboard.startswith(("http://", "https://")) else None
    return render("cluster.html", **{k: info.get(k) for k in keys}, pool=pool_view(workers), queue=q,
                  dashboard=href, error=error)


def video_widget(data: bytes, width: Any, height: Any):
    """MP4 bytes as a looping, autoplaying ipywidgets Video, scaled up to at least MIN_VIDEO_PX wide.

    The bytes travel to the browser over the widget comm; they are never written into the notebook.
    """
    import ipywidgets as W

    w = to_int(width) or 0
    h = to_int(height) or 0
    if w <= 0 or h <= 0:
        w = h = MIN_VIDEO_PX
    scale = max(1.0, MIN_VIDEO_PX / w)
    return W.Video(value=bytes(data), format="mp4", autoplay=True, loop=True, controls=True,
                   width=str(int(w * scale)), height=str(int(h * scale)))


def job_widget(record: Any, video: Any):
    """The summary of a done job above its video, as one widget."""
    import ipywidgets as W

    return W.VBox([W.HTML(job_html(record)), video])


# RetryTracker, ordinal, progress_view, queue_note and stopped_note live in display.notes and display.progress;
# they still import from here, for the code written before they moved.
__all__ = ["MIN_VIDEO_PX", "RetryTracker", "STATIC_MIME", "WIDGET_MIME", "cluster_html", "error_html", "job_html",
           "job_view", "job_widget", "media_view", "ordinal", "progress_view", "queue_note", "render", "status_badge",
           "stopped_note", "thumbnail_uri", "timings_line", "video_widget"]
