"""HTML for jobs, the cluster handle and the widgets: plain data in, escaped HTML out.

A leaf module: it imports nothing from mochi_lab, reads no store and no file. Records are taken by
duck typing (a `JobRecord` or any object or mapping with its field names), because the store is a
trust boundary: any field may hold any JSON value, markup included, so

* every view is a Jinja2 template in `mochi_lab/templates/` rendered with autoescaping ON, and no
  stored value is ever marked safe;
* records are first flattened into plain views here (`_job_view`, `_worker_view`) by helpers that
  never assume a type: a number where a number belongs is formatted, anything else is shown as text;
* colours are JupyterLab's CSS variables with fallbacks, so the views follow the theme.

The widgets in `mochi_lab.widgets` render their HTML through `render` with the templates here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
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


# -- defensive conversions (the store may hold a string where a number belongs) ---------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def to_int(value: Any, default: int | None = None) -> int | None:
    """`value` as an int when it is a finite number (floats truncate), else `default`."""
    return int(value) if _is_number(value) else default


def to_float(value: Any, default: float | None = None) -> float | None:
    return float(value) if _is_number(value) else default


def text(value: Any, missing: str = "-") -> str:
    """Any value as display text: None is `missing`, everything else `str()` (templates escape it)."""
    return missing if value is None else str(value)


def num(value: Any, spec: str = "", missing: str = "-") -> str:
    """A number formatted with `spec`; anything that is not a finite number is shown as text."""
    if _is_number(value):
        try:
            return format(value, spec)
        except ValueError:  # e.g. ".2f" is fine for ints, "d" is not for floats
            return str(value)
    return text(value, missing)


def seconds(value: Any) -> str:
    s = to_float(value)
    if s is None:
        return text(value)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def gib(value: Any) -> str:
    n = to_float(value)
    return text(value) if n is None else f"{n / 2**30:.2f} GiB"


def when(value: Any) -> str:
    """A timestamp as local time, with the date only when it is not today."""
    t = to_float(value)
    if t is None:
        return text(value or None)
    if not t:
        return "-"
    try:
        lt, now = time.localtime(t), time.localtime()
    except (OverflowError, OSError, ValueError):
        return str(value)
    return time.strftime("%H:%M:%S" if lt[:3] == now[:3] else "%Y-%m-%d %H:%M", lt)


def short(value: Any, n: int = 80) -> str:
    s = text(value, "")
    return s if len(s) <= n else s[: n - 1] + "…"


def mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a mapping, else an empty one (a hostile record may hold a list or a string)."""
    return value if isinstance(value, Mapping) else {}


def strings(value: Any) -> list[str]:
    """A list of display strings from a list (tags), a lone value, or nothing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return [text(v) for v in value]
    return [text(value)]


def field(record: Any, name: str, default: Any = None) -> Any:
    """A record field by attribute (JobRecord) or key (a mapping); `default` when it has none."""
    if isinstance(record, Mapping):
        return record.get(name, default)
    try:
        return getattr(record, name, default)
    except Exception:  # a property that raises: the view shows the default
        return default


def basename(value: Any) -> str:
    return text(value, "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def status_colour(status: Any) -> str:
    return STATUS_COLOURS.get(status, MUTED) if isinstance(status, str) else MUTED


def state_colour(state: Any) -> str:
    return STATE_COLOURS.get(state, MUTED) if isinstance(state, str) else MUTED


# -- templates -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _env() -> Environment:
    # autoescape=True for every template whatever its name; StrictUndefined: a typo fails loudly in tests
    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, seconds=seconds, gib=gib, when=when, short=short, text=text)
    env.globals.update(MUTED=MUTED, BORDER=BORDER, PLACEHOLDER=PLACEHOLDER, ERROR=ERROR,
                       status_colour=status_colour, state_colour=state_colour)
    return env


def render(template: str, macro: str | None = None, /, **context: Any) -> str:
    """Render `template` (a file in mochi_lab/templates), or one of its macros, with autoescaping."""
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
def job_view(r: Any) -> dict[str, Any]:
    """The display facts of a job record, each a plain value the templates escape (no type assumed)."""
    p = mapping(field(r, "params"))
    timings = mapping(field(r, "timings"))
    meta = mapping(field(r, "meta"))
    artifacts = mapping(field(r, "artifacts"))
    status, stage = field(r, "status"), field(r, "stage")
    step, total_steps = field(r, "step"), field(r, "total_steps")
    total = to_int(total_steps) or to_int(p.get("num_inference_steps")) or 0
    if not _is_number(total_steps) and total_steps not in (None, ""):
        total = total_steps  # a hostile total is shown, never used as a number
    step_n = to_int(step)
    attempts = field(r, "attempts")
    return {
        "id": field(r, "id"),
        "status": status,
        "stage": stage if stage != status else None,
        "step": step,
        "total": total,
        # a <progress> needs numbers; anything else is shown as text beside it
        "progress": (max(0, min(step_n, total)) if step_n is not None and isinstance(total, int) and total > 0
                     else None),
        "running": status == "running",
        "prompt": p.get("prompt", ""),
        "negative_prompt": p.get("negative_prompt"),
        "width": p.get("width"), "height": p.get("height"), "num_frames": p.get("num_frames"),
        "steps": p.get("num_inference_steps"), "seed": p.get("seed"), "guidance": p.get("guidance_scale"),
        "fps": p.get("fps"), "model": p.get("model"),
        "worker": meta.get("worker_id") or field(r, "worker_id"),
        "timings": ([(k[:-2], timings[k]) for k in TIMING_STAGES if k in timings] if "run_s" in timings else []),
        "run_s": timings.get("run_s"),
        "video": basename(artifacts.get("video")) if artifacts.get("video") else None,
        "error": field(r, "error"),
        "traceback": field(r, "traceback"),
        "experiment": field(r, "experiment"),
        "tags": strings(field(r, "tags")),
        "created_at": field(r, "created_at"),
        # shown only when it says something: a retried job, or a value that is not a count
        "attempts": attempts if (to_int(attempts, 0) > 1 or not (attempts is None or _is_number(attempts)))
        else None,
    }


def job_html(record: Any) -> str:
    """The compact job summary (a `JobRecord` or a mapping of its fields)."""
    return render("job.html", r=job_view(record))


def cluster_html(info: Mapping[str, Any]) -> str:
    """The handle: backend, address, store (password-free text), account, model, workers."""
    info = mapping(info)
    keys = ("backend", "address", "store", "account", "model", "workers")
    return render("cluster.html", **{k: info.get(k) for k in keys})


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


__all__ = ["MIN_VIDEO_PX", "WIDGET_MIME", "cluster_html", "error_html", "job_html", "job_view", "job_widget",
           "render", "status_badge", "video_widget"]
