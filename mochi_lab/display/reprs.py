"""HTML for jobs, the cluster handle and the widgets: plain data in, escaped HTML out.

A leaf module: it imports nothing from mochi_lab, reads no store and no file. Records are taken by
duck typing (a `JobRecord` or any object or mapping with its field names), because the store is a
trust boundary: any field may hold any JSON value, markup included, so

* every view is a Jinja2 template in `mochi_lab/display/templates/` rendered with autoescaping ON, and no
  stored value is ever marked safe;
* records are first flattened into plain views here (`_job_view`, `_worker_view`) by helpers that
  never assume a type: a number where a number belongs is formatted, anything else is shown as text;
* colours are JupyterLab's CSS variables with fallbacks, so the views follow the theme.

The widgets in `mochi_lab.display.widgets` render their HTML through `render` with the templates here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    # Jinja2 is loaded at the first render: a job's follower uses RetryTracker and queue_note from here in
    # scripts that never display anything
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
LEASE_GRACE_S = 2.0  # a lease this far past its deadline means its worker stopped heartbeating


def ordinal(n: Any) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 22nd (anything that is not a whole number is shown as text)."""
    k = to_int(n)
    if k is None:
        return text(n)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def timings_line(timings: Any) -> list[tuple[str, str]]:
    """The per-stage seconds a record holds, as (label, "1.2 s") pairs in stage order; nothing if none."""
    t = mapping(timings)
    return [(label, seconds(t[key])) for key, label in TIMING_LABELS if key in t and t[key] is not None]


def queue_note(position: Any) -> str | None:
    """A queued job's place, as `Job.queue_position()` reports it: "3rd of 5 in the queue · ~2 min"."""
    p = mapping(position)
    pos, of = to_int(p.get("position")), to_int(p.get("queued"))
    if pos is None:
        return None
    line = f"{ordinal(pos)} of {of} in the queue" if of and of > 1 else "next in the queue"
    eta = to_float(p.get("eta_s"))
    if eta is not None:
        line += f" · ~{_eta_words(eta)}"
    if to_int(p.get("workers")) == 0:
        line += " · no worker serves this model yet"
    return line


def _eta_words(s: float) -> str:
    if s < 60:
        return f"{max(5, int(round(s / 5.0)) * 5)} s"
    return f"{int(round(s / 60.0))} min"


class RetryTracker:
    """Follows one job's successive records and says what a snapshot cannot: that a worker was lost.

    A record holds only the attempt count; the stage where a lost attempt stopped is the last one this
    tracker saw before the job went back to the queue (or came back with a higher attempt). Pure:
    records in, lines out, no I/O. `observe` returns new events (for a text progress bar), `notes`
    the lines a view shows now.
    """

    def __init__(self) -> None:
        self.attempt: int | None = None  # the attempt count of the last record seen
        self.status: Any = None
        self.stage: str | None = None  # the last stage seen while the current attempt ran
        self.lost = False  # a worker of this job was lost (seen, or implied by the attempt count)
        self.lost_stage: str | None = None  # where, when seen
        self.lease_expired_for: float | None = None

    def observe(self, r: Any, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        status, stage = field(r, "status"), field(r, "stage")
        attempt = to_int(field(r, "attempts"), 0) or 0
        events: list[str] = []
        if self.attempt is None:  # the first record: a retry already under way shows in its count
            self.lost = status == "running" and attempt > 1 or status == "queued" and attempt >= 1
        else:
            was_running = self.status == "running"
            if was_running and (attempt > self.attempt or status == "queued"):
                self.lost, self.lost_stage, self.stage = True, self.stage, None
                events.append(self.line(status, attempt))
            elif attempt > self.attempt and self.lost and self.status == "queued":
                events.append(self.line(status, attempt))  # the requeued job was claimed again
        if status == "running" and isinstance(stage, str) and stage != "claimed":
            self.stage = stage
        self.attempt, self.status = attempt, status
        expires = to_float(field(r, "lease_expires_at"))
        self.lease_expired_for = (now - expires if status == "running" and expires is not None
                                  and now - expires > LEASE_GRACE_S else None)
        return events

    def line(self, status: Any, attempt: int) -> str:
        where = f"worker lost at {self.lost_stage}" if self.lost_stage else "worker lost"
        if status == "queued":
            return f"{where}; queued again for attempt {attempt + 1}"
        return f"{where}; retrying, attempt {attempt}"

    def notes(self, r: Any) -> list[str]:
        """The lines a view shows for the record last observed (none once the job has ended)."""
        status = field(r, "status")
        out: list[str] = []
        if self.lost and status in ("running", "queued"):
            out.append(self.line(status, to_int(field(r, "attempts"), 0) or 0))
        if self.lease_expired_for is not None and status == "running":
            out.append(f"no heartbeat from its worker for {seconds(self.lease_expired_for)}: the job goes back "
                       "to the queue when its lease is taken back")
        return out


def stopped_note(r: Any) -> str | None:
    """Where a cancelled job stopped: "stopped at denoising step 57/200", after its last step (while its
    worker decoded or encoded: the stage a cancelled record keeps is "cancelled"), or that it never started."""
    if field(r, "status") != "cancelled":
        return None
    step, total = to_int(field(r, "step")), to_int(field(r, "total_steps"))
    if not field(r, "started_at") and not step:
        return "cancelled before it started"
    if step and total and step >= total:
        return f"stopped after denoising ({step}/{total} steps), before its video was written"
    if step and total:
        return f"stopped at denoising step {step}/{total}"
    return "stopped before denoising"


def progress_view(r: Any) -> dict[str, Any]:
    """A job's progress as every view of it shows it (the live HTML, the text bar, a Studio card, the
    ClusterPanel, the gateway's page, `Job.progress`), so that they agree on one record:

    `fraction` of the whole job done, 0..1 to the thousandth: the worker's own figure (`live.fraction`: the
    time taken over that plus the ETA, from the job's submission, each stage weighed by what this worker
    expects it to take), else the denoising steps' share (`measure` says which; None where neither is a
    number); 0 while queued, 1 once done. `label`: the stage, with the step while denoising ("denoising
    47/200", "decoding", "queued").
    `step` and `total` (None where not numbers), `elapsed_s` (since the running attempt's claim) and `eta_s`
    (None where unknown; 0 once ended), and `times`: "elapsed 4.2 s · ETA 12 s" while it runs ("ETA …" until
    the worker has a figure). No type is assumed: a value that is not a number is shown as text."""
    status, stage = field(r, "status"), field(r, "stage")
    live = mapping(field(r, "live"))
    raw_step, raw_total = field(r, "step"), field(r, "total_steps")
    step = to_int(raw_step)
    total = to_int(raw_total) or to_int(mapping(field(r, "params")).get("num_inference_steps"))
    total = total if total and total > 0 else None
    if not _is_number(raw_total) and raw_total not in (None, ""):
        shown_total: Any = raw_total  # a hostile total is shown, never used as a number
    else:
        shown_total = total
    running, ended = status == "running", status in ("done", "failed", "cancelled")
    worker_fraction = to_float(live.get("fraction"))
    fraction: float | None
    measure = "the whole job"
    if status == "done":
        fraction = 1.0
    elif not (running or ended):  # queued, or a status this version does not know
        fraction = 0.0
    elif worker_fraction is not None:
        fraction = worker_fraction
    else:  # the worker has no pace to weigh the stages by yet (its first job of this model)
        fraction, measure = (step / total if step is not None and total else None), "the denoising steps"
    # to the thousandth every view draws (the HTML's bar, a card's, the text bar's units): rounded once, here,
    # so no view rounds a half-thousandth the other way
    fraction = None if fraction is None else round(max(0.0, min(1.0, fraction)), 3)
    label = text(stage if stage not in (None, "") else status)
    if stage == "denoising" and raw_step is not None and shown_total is not None:
        label += f" {num(raw_step)}/{num(shown_total)}"
    elapsed = to_float(live.get("elapsed_s")) if running else None
    eta = to_float(live.get("eta_s")) if running else (0.0 if ended else None)
    eta = None if eta is None else max(0.0, eta)
    times = [f"elapsed {seconds(elapsed)}"] if elapsed is not None else []
    if running:
        times.append("ETA …" if eta is None else f"ETA {seconds(eta)}")
    return {"fraction": fraction, "percent": None if fraction is None else int(fraction * 100), "measure": measure,
            "label": label, "stage": stage, "status": status, "step": step, "total": total, "elapsed_s": elapsed,
            "eta_s": eta, "running": running, "times": " · ".join(times)}


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
    if not _is_number(total_steps) and total_steps not in (None, ""):
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
        "attempts": attempts if (to_int(attempts, 0) > 1 or not (attempts is None or _is_number(attempts)))
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


__all__ = ["MIN_VIDEO_PX", "RetryTracker", "STATIC_MIME", "WIDGET_MIME", "cluster_html", "error_html", "job_html",
           "job_view", "job_widget", "media_view", "ordinal", "progress_view", "queue_note", "render", "status_badge",
           "stopped_note", "thumbnail_uri", "timings_line", "video_widget"]
