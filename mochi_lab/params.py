"""`GenerationParams`: what one video needs, validated where input enters, before anything is queued.

Validation happens at the boundaries only: the handle (`MochiCluster.generate`, experiments), the CLI,
and a worker when it claims a job (the store is a trust boundary for workers). Stored params are
rebuilt without re-validation (`GenerationParams.stored`). The Python API is strict: an int field takes
an int (not a bool, a string or bytes); text from the CLI or JSON is parsed at those boundaries.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mochi_lab.lora_refs import LORA_SCALE_MAX, LORA_SCALE_MIN, LoraRef, lora_refs, plain_number

MAX_PROMPT_TOKENS = 256  # Mochi's T5 max_sequence_length
MAX_PROMPT_CHARS = 4000  # far above any 256-token prompt; keeps absurd inputs out of the store
FRAMES_MIN, FRAMES_MAX = 1, 283
SIZE_MIN, SIZE_MAX = 16, 1280
# diffusers' linear_quadratic_schedule divides by num_steps // 2: one step is a ZeroDivisionError
STEPS_MIN, STEPS_MAX = 2, 200
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
FPS_MIN, FPS_MAX = 1, 120
SEED_MAX = 2**32 - 1
PRIORITY_MIN, PRIORITY_MAX = -100, 100
MAX_TAGS, MAX_TAG_CHARS, MAX_KEY_CHARS = 32, 64, 200
# What a sweep may vary besides the fields (mochi_lab.sweep folds each into the fields before validation)
SWEEP_ONLY = {"lora_scale": "the scale of every adapter its run's lora names (a run without one ignores it)"}

LIMITS: dict[str, tuple[float, float]] = {
    "num_frames": (FRAMES_MIN, FRAMES_MAX),
    "height": (SIZE_MIN, SIZE_MAX),
    "width": (SIZE_MIN, SIZE_MAX),
    "num_inference_steps": (STEPS_MIN, STEPS_MAX),
    "guidance_scale": (GUIDANCE_MIN, GUIDANCE_MAX),
    "fps": (FPS_MIN, FPS_MAX),
    "seed": (0, SEED_MAX),
    "priority": (PRIORITY_MIN, PRIORITY_MAX),
}
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
# Experiment names travel inside idempotency keys ("exp/<name>/<run>/<attempt>") and file names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(name: str) -> str:
    """Raise ValueError unless `name` is 1-64 letters, digits, '.', '_' or '-' (first a letter or digit)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"experiment name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {name!r:.80}"
        )
    return name


class ParamsError(ValueError):
    """Invalid generation parameters; the message names each field and what is allowed."""

    def _render_traceback_(self) -> list[str]:  # IPython: the message, not 20 lines of library frames
        return [f"\x1b[31mParamsError\x1b[0m: {self}"]


def _frames_hint(n: int) -> str:
    lo = max(FRAMES_MIN, (n - 1) // 6 * 6 + 1)
    hi = lo + 6
    if lo == n:
        return ""
    if hi > FRAMES_MAX:
        return f"; nearest valid value is {lo}"
    return f"; nearest valid values are {lo} or {hi}"


def _check_text(name: str, v: str) -> str:
    if len(v) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(v)} characters; at most {MAX_PROMPT_CHARS} (and {MAX_PROMPT_TOKENS} tokens)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate at position {exc.start})") from None
    return v


class GenerationParams(BaseModel):
    """One video's parameters, with diffusers' own argument names. seed=None draws and records one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: str
    negative_prompt: str = ""
    num_frames: int = 19
    height: int = 480
    width: int = 848
    num_inference_steps: int = 64
    guidance_scale: float = 4.5
    seed: int | None = Field(default=None, validate_default=True)
    fps: int = 30
    model: str = "tiny"
    # LoRA adapters of the account, applied to the loaded transformer for this job only (see mochi_lab.adapters)
    lora: tuple[LoraRef, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _numpy_numbers(cls, data: Any) -> Any:
        # Sweeps often come from numpy (np.arange, np.linspace): take its scalars as the numbers they are.
        if isinstance(data, dict):
            data = {k: plain_number(v) for k, v in data.items()}
        return data

    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v: Any) -> Any:
        return lora_refs(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must be a non-empty string")
        return _check_text("prompt", v)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str) -> str:
        return _check_text("negative_prompt", v)

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, v: int) -> int:
        if not FRAMES_MIN <= v <= FRAMES_MAX or (v - 1) % 6:
            raise ValueError(
                f"num_frames must be of the form 6k+1 between {FRAMES_MIN} and {FRAMES_MAX} "
                f"(1, 7, 13, 19, ..., 85, ..., 163, ...), got {v}{_frames_hint(v) if FRAMES_MIN <= v else ''}"
            )
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int, info) -> int:
        if not SIZE_MIN <= v <= SIZE_MAX or v % 16:
            raise ValueError(
                f"{info.field_name} must be a multiple of 16 between {SIZE_MIN} and {SIZE_MAX}, got {v}"
                + (f"; nearest valid values are {v // 16 * 16} or {v // 16 * 16 + 16}" if SIZE_MIN < v < SIZE_MAX and v % 16 else "")
            )
        return v

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if not STEPS_MIN <= v <= STEPS_MAX:
            raise ValueError(f"num_inference_steps must be between {STEPS_MIN} and {STEPS_MAX}, got {v}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float) -> float:
        if not GUIDANCE_MIN <= v <= GUIDANCE_MAX:  # NaN fails this too
            raise ValueError(f"guidance_scale must be between {GUIDANCE_MIN} and {GUIDANCE_MAX}, got {v}")
        return float(v)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int:
        if v is None:
            return secrets.randbelow(SEED_MAX + 1)
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"seed must be between 0 and {SEED_MAX} (or None for a random seed), got {v}")
        return v

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: int) -> int:
        if not FPS_MIN <= v <= FPS_MAX:
            raise ValueError(f"fps must be between {FPS_MIN} and {FPS_MAX}, got {v}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        # Which models exist is the pool's business (`check_model`); here only the name's form.
        if not MODEL_RE.fullmatch(v):
            raise ValueError(f"model must be a model name (letters, digits, '.', '_', '-', '/'), got {v!r}")
        return v

    @classmethod
    def parse(cls, prompt: str | None = None, **params: Any) -> "GenerationParams":
        """Validate, raising `ParamsError` with one line per bad field."""
        if prompt is not None:
            params["prompt"] = prompt
        try:
            return cls(**params)
        except ValidationError as exc:
            raise ParamsError(_describe(exc)) from None

    @classmethod
    def stored(cls, params: Mapping[str, Any]) -> "GenerationParams":
        """Rebuild params that were validated when they entered (no checks: reads never fail on old data)."""
        known = {k: v for k, v in params.items() if k in cls.model_fields}
        if known.get("lora"):
            known["lora"] = tuple(LoraRef.model_construct(**r) if isinstance(r, Mapping) else r
                                  for r in known["lora"])
        return cls.model_construct(**known)

    def to_dict(self) -> dict[str, Any]:
        """The params as plain JSON-able data. A job with no adapter has no `lora` key: its params, and so its
        result-cache key, are what they were before adapters existed."""
        data = self.model_dump()
        if self.lora:
            data["lora"] = [r.model_dump() for r in self.lora]
        else:
            data.pop("lora", None)
        return data

    def with_adapters(self, resolved: Iterable["LoraRef"]) -> "GenerationParams":
        """These params with `lora` replaced by `resolved` (the same names, their files' sha256 filled in)."""
        return self.model_copy(update={"lora": tuple(resolved)})


def with_lora_scale(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep's run spec with its `lora_scale` folded into `lora`: every adapter named there at that scale
    (dropped where `lora` names none, so base runs collapse into one). ParamsError naming lora_scale."""
    spec = dict(spec)
    scale = plain_number(spec.pop("lora_scale"))
    if (isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not LORA_SCALE_MIN <= scale <= LORA_SCALE_MAX):
        raise ParamsError(f"invalid generation parameters:\n  lora_scale: must be a number between "
                          f"{LORA_SCALE_MIN} and {LORA_SCALE_MAX}, got {scale!r:.60}")
    try:
        refs = lora_refs(spec.get("lora"))
    except (ValueError, TypeError):  # the params' own check names what is wrong with it
        return spec
    if refs:
        spec["lora"] = [{**r, "scale": float(scale)} for r in refs]
    return spec


def check_model(model: Any, models: Iterable[str]) -> str:
    """Raise ParamsError unless `model` is one of `models` (what the pool serves)."""
    models = sorted(models)
    if model not in models:
        raise ParamsError(f"invalid generation parameters:\n  model: must be one of {', '.join(models)}, got {model!r}")
    return model


def check_prompt_tokens(params: GenerationParams, count: Any) -> None:
    """Raise ParamsError if a prompt is over the text encoder's limit; `count(text)` counts its tokens."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if len(text) < MAX_PROMPT_TOKENS:  # a T5 token covers at least one character
            continue
        n = count(text)
        if n > MAX_PROMPT_TOKENS:
            raise ParamsError(
                f"invalid generation parameters:\n  {name}: is {n} tokens for model {params.model!r}; the limit is "
                f"{MAX_PROMPT_TOKENS} (the text encoder's max_sequence_length)"
            )


def latent_tokens(num_frames: int, height: int, width: int) -> int:
    """Transformer tokens of one video: Mochi's VAE packs 6 frames (+1) and 8x8 pixels into a latent,
    the transformer patches 2x2 latents."""
    return ((num_frames - 1) // 6 + 1) * (height // 16) * (width // 16)


def job_cost(params: GenerationParams) -> int:
    """A job's size for admission: latent tokens x denoising steps (what a step's cost grows with)."""
    return latent_tokens(params.num_frames, params.height, params.width) * params.num_inference_steps


def check_admission(params: GenerationParams, limit: int | None) -> None:
    """Refuse a job larger than the pool's `limit` (token-steps), naming the limit and what would fit."""
    if limit is None or job_cost(params) <= limit:
        return
    per_frame = (params.height // 16) * (params.width // 16) * params.num_inference_steps
    latent_frames = limit // per_frame
    fits = (f"at {params.width}x{params.height} and {params.num_inference_steps} steps, at most "
            f"{(latent_frames - 1) * 6 + 1} frames fit" if latent_frames >= 1 else
            f"even 1 frame at {params.width}x{params.height} and {params.num_inference_steps} steps is too large")
    raise ParamsError(
        f"invalid generation parameters:\n  size: {params.num_frames} frames at {params.width}x{params.height} with "
        f"{params.num_inference_steps} steps is {job_cost(params):,} token-steps; this pool admits at most "
        f"{limit:,} for model {params.model!r} ({fits}; fewer steps or a smaller size fit too)"
    )


def check_tags(v: Any) -> tuple[str, ...]:
    """Tags (of a job, of an experiment): at most MAX_TAGS strings of 1-MAX_TAG_CHARS characters; ValueError if not."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ValueError(f"tags must be a list of strings, got {type(v).__name__} {v!r:.60}")
    v = tuple(v)
    if len(v) > MAX_TAGS:
        raise ValueError(f"tags: at most {MAX_TAGS}, got {len(v)}")
    for tag in v:
        if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG_CHARS:
            raise ValueError(f"tags must be strings of 1-{MAX_TAG_CHARS} characters, got {tag!r:.80}")
        _check_text("tags", tag)
    return v


class SubmitOptions(BaseModel):
    """What `generate` takes besides the video's params: checked with the same care, on every store."""

    model_config = ConfigDict(extra="forbid", strict=True)

    priority: int = 0
    tags: tuple[str, ...] = ()
    experiment: str | None = None
    idempotency_key: str | None = None

    @field_validator("priority")
    @classmethod
    def _priority(cls, v: int) -> int:
        if not PRIORITY_MIN <= v <= PRIORITY_MAX:
            raise ValueError(f"priority must be an integer between {PRIORITY_MIN} and {PRIORITY_MAX}, got {v}")
        return v

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        return check_tags(v)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str | None) -> str | None:
        return None if v is None else validate_name(v)

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and (not 0 < len(v) <= MAX_KEY_CHARS or not v.isprintable()):
            raise ValueError(f"idempotency_key must be 1-{MAX_KEY_CHARS} printable characters, got {v!r:.80}")
        return v if v is None else _check_text("idempotency_key", v)

    @classmethod
    def parse(cls, **options: Any) -> "SubmitOptions":
        try:
            return cls(**options)
        except ValidationError as exc:
            raise ParamsError(_describe(exc, cls)) from None


def _describe(exc: ValidationError, model: type[BaseModel] = GenerationParams) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"][:1]) or "params"
        # a validator's message starts with its field's name, which the line already begins with: name it once
        msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{field}: ").removeprefix(f"{field} ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown parameter; allowed: {', '.join(model.model_fields)}"
        elif err["type"] == "missing":
            msg = "is required"
        elif err["type"] in ("int_type", "float_type", "string_type", "bool_type", "tuple_type"):
            want = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
                    "tuple_type": "a list"}.get(err["type"], "a boolean")
            bounds = LIMITS.get(field)
            allowed = f" between {bounds[0]} and {bounds[1]}" if bounds else ""
            msg = f"must be {want}{allowed}, got {type(err['input']).__name__} {err['input']!r:.60}"
        lines.append(f"{field}: {msg}")
    return "invalid generation parameters:\n  " + "\n  ".join(lines)
