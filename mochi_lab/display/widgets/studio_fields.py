"""The Studio form's fields, apart from its widgets: what each offers, what it starts at, and how it is checked.

The choices: size presets (and a custom size), lengths in 6k+1 frames (a length typed in seconds snaps to the
nearest), the models the pool's workers serve, the account's LoRA adapters (none by default) and a scale. The defaults suit the pool: small and few steps on CPU workers,
Mochi's defaults on GPUs. The check is GenerationParams' own, on the values as typed; each error is put beside
its field in the form's words (its labels), and no value is silently clamped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mochi_lab.params import LIMITS, GenerationParams, ParamsError

from ._format import mapping, render

if TYPE_CHECKING:
    from mochi_lab.client.cluster import MochiCluster


def _int_limits(name: str) -> tuple[int, int]:
    lo, hi = LIMITS[name]
    return int(lo), int(hi)


FRAMES_MIN, FRAMES_MAX = _int_limits("num_frames")
HEIGHT_MIN, HEIGHT_MAX = _int_limits("height")
WIDTH_MIN, WIDTH_MAX = _int_limits("width")
STEPS_MIN, STEPS_MAX = _int_limits("num_inference_steps")
FPS_MIN, FPS_MAX = _int_limits("fps")
SEED_MIN, SEED_MAX = _int_limits("seed")
GUIDANCE_MIN, GUIDANCE_MAX = (float(v) for v in LIMITS["guidance_scale"])
NO_ADAPTER = ("none", None)  # the adapter menu's first entry, and its default: the base model
# Mochi needs num_frames = 6k+1 and sizes divisible by 16 (diffusers checks only 8).
FRAME_CHOICES = [n for n in range(FRAMES_MIN, FRAMES_MAX + 1) if n % 6 == 1]
HEIGHT_CHOICES = [n for n in range(HEIGHT_MIN, HEIGHT_MAX + 1) if n % 16 == 0]
WIDTH_CHOICES = [n for n in range(WIDTH_MIN, WIDTH_MAX + 1) if n % 16 == 0]
SIZE_CHOICES = HEIGHT_CHOICES  # the name older code imported
CUSTOM = "custom"
# (label, (width, height)): Mochi's native sizes first, then sizes a CPU pool finishes in seconds.
SIZE_PRESETS: list[tuple[str, Any]] = [
    ("848×480 landscape (Mochi)", (848, 480)),
    ("480×848 portrait", (480, 848)),
    ("640×640 square", (640, 640)),
    ("432×240 small (CPU)", (432, 240)),
    ("240×432 small portrait (CPU)", (240, 432)),
    ("96×64 tiny (CPU)", (96, 64)),
    ("custom", CUSTOM),
]
# A CPU pool runs the tiny model: a small size, a second or two of video and few steps keep a job to seconds.
CPU_DEFAULTS = {"width": 432, "height": 240, "num_frames": 13, "fps": 8, "num_inference_steps": 8}
# The form's error boxes, in the order errors are checked; each ParamsError line names one of these.
FIELDS = ("prompt", "negative_prompt", "size", "duration", "num_frames", "fps", "num_inference_steps",
          "guidance_scale", "seed", "model", "lora")
FIELD_OF = {"width": "size", "height": "size"}
# What the form calls each GenerationParams field: its errors say the label the user sees beside the field.
LABELS = {"prompt": "prompt", "negative_prompt": "negative prompt", "width": "width", "height": "height",
          "num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance", "seed": "seed",
          "fps": "fps", "model": "model", "size": "size", "lora": "LoRA"}


# -- lengths: seconds and frames -------------------------------------------------------------------
def snap_frames(duration_s: float, fps: int) -> int:
    """The 6k+1 frame count nearest to `duration_s` at `fps` (a tie goes to the shorter; at least 1 frame)."""
    n = duration_s * fps
    return max(1, 6 * int(math.ceil((n - 1) / 6 - 0.5)) + 1)


def positive(value: Any) -> bool:
    """A finite number above 0 (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def duration_of(frames: Any, fps: int) -> float:
    """How long `frames` last at `fps`, rounded for the field (13 frames at 8 fps: 1.625 s)."""
    return round(frames / fps, 3) if isinstance(frames, int) else 0.0


def as_number(value: Any, *, integer: bool) -> Any:
    """A typed value as the number it is; a float with a fraction stays a float (the check then says so)."""
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- what the pool offers, and the defaults that suit it ---------------------------------------------
def worker_rows(cluster: "MochiCluster") -> list[Any] | None:
    """The pool's worker rows, or None when they cannot be read."""
    try:
        return [mapping(r) for r in cluster.workers()]
    except Exception:
        return None


def device_of(cluster: "MochiCluster", rows: list[Any] | None = None) -> str:
    """"cuda" when the pool's workers have GPUs, else "cpu" (also when the pool cannot be read)."""
    rows = worker_rows(cluster) if rows is None else rows
    return "cuda" if any(r.get("device") == "cuda" or r.get("gpu_name") for r in rows or ()) else "cpu"


def field_defaults(model: str, device: str = "cuda") -> dict[str, Any]:
    """The form's starting values (GenerationParams names): Mochi's defaults, or CPU_DEFAULTS on a CPU pool."""
    fields = GenerationParams.model_fields
    out = {name: f.default for name, f in fields.items() if name not in ("prompt", "seed")}
    if device != "cuda":
        out.update(CPU_DEFAULTS)
    out.update(seed=None, model=model)
    return out


def model_choices(cluster: "MochiCluster", default: str, rows: list[Any] | None, *, asked: bool = False) -> list[str]:
    """The models the pool's workers have loaded (and the cluster accepts), as dropdown labels: a model no
    worker serves would wait in the queue for ever. With no worker to go by, the cluster's default; a model
    asked for by name (`Studio(..., model=...)`) is offered too."""
    try:
        accepted = {str(m) for m in cluster.models()}
    except Exception:  # an old or unreachable backend: the workers alone say
        accepted = set()
    served = {str(r.get("model")) for r in rows or () if isinstance(r.get("model"), str) and r.get("model")}
    if accepted:
        served &= accepted
    models = sorted(served) or [str(default)]
    return models if not asked or str(default) in models else sorted([*models, str(default)])


def adapter_choices(cluster: "MochiCluster", asked: str | None = None) -> list[tuple[str, str | None]]:
    """The adapter menu: (label, name) of "none" and then each of the account's adapters
    (`cluster.adapters.list()`), labelled with its model and rank; only "none" when they cannot be read. An adapter
    asked for by name (`Studio(..., lora=...)`) is offered too (the backend then says if it is not there)."""
    try:
        rows = [mapping(r) for r in cluster.adapters.list()]
    except Exception:  # an old or unreachable backend, or no adapters API: the base model alone
        rows = []
    out = [NO_ADAPTER]
    for row in rows:
        name = row.get("name")
        if isinstance(name, str) and name:
            out.append((f"{name} ({row.get('model')}, rank {row.get('rank')})", name))
    if asked and asked not in {name for _, name in out}:
        out.append((asked, asked))
    return out


# -- the check ---------------------------------------------------------------------------------------
def form_errors(params: dict[str, Any], duration: Any, *, attempted: bool) -> dict[str, list[str]]:
    """The form's values (`Studio.params()`, and the duration as typed) checked as GenerationParams checks
    them: {field: error lines}, keyed by the form's fields (FIELDS) where it has one. The prompt is checked
    only once a submission was `attempted` (an empty form is not an error)."""
    params = dict(params)
    errors: dict[str, list[str]] = {}
    frames = params["num_frames"]
    fps = params["fps"]
    if not positive(duration):
        errors.setdefault("duration", []).append(f"duration: must be more than 0 s, got {duration}")
    elif isinstance(fps, int) and fps > 0 and snap_frames(duration, fps) > FRAMES_MAX:
        longest = (FRAMES_MAX - 1) / fps
        errors.setdefault("duration", []).append(
            f"duration: {duration:g} s at {fps} fps is {snap_frames(duration, fps)} frames; at most {FRAMES_MAX} "
            f"frames ({longest:.1f} s at {fps} fps)")
    if frames is None:
        params["num_frames"] = FRAMES_MIN  # a cleared field: the type check below names it
    prompt = params.pop("prompt")
    if not attempted and not prompt.strip():
        prompt = "x"  # not yet checked: only the other fields
    try:
        GenerationParams.parse(prompt, **params)
    except ParamsError as exc:
        for name, line in error_lines(str(exc)):
            if name == "num_frames" and "duration" in errors:
                continue  # the duration's own error says it better
            errors.setdefault(FIELD_OF.get(name, name), []).append(line)
    return errors


def error_lines(message: str) -> list[tuple[str, str]]:
    """A ParamsError's lines as (field, "label: what is wrong"), each named by the form's label for
    its field (`LABELS`); a message without fields is one line.

    "prompt: prompt must be ..." reads "prompt: must be ...": the label says the field once."""
    out = []
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith("invalid generation parameters"):
            continue
        name, sep, rest = line.partition(":")
        if not sep or " " in name.strip():
            out.append(("", line))
            continue
        name, rest = name.strip(), rest.strip()
        out.append((name, f"{LABELS.get(name, name)}: {rest.removeprefix(name + ' ')}"))
    return out or [("", message)]


def field_error_html(lines: list[str]) -> str:
    """A form's error lines in red, wrapped between words only (a notebook's <pre> breaks mid-word)."""
    return render("studio.html", "field_error", lines=lines)
