"""`GenerationParams`: what one video needs, validated before anything is queued."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mochi_lab.settings import known_models

MAX_PROMPT_TOKENS = 256  # Mochi's T5 max_sequence_length
FRAMES_MIN, FRAMES_MAX = 1, 283
SIZE_MIN, SIZE_MAX = 16, 1280
STEPS_MIN, STEPS_MAX = 1, 200
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
FPS_MIN, FPS_MAX = 1, 120
SEED_MAX = 2**32 - 1

class ParamsError(ValueError):
    """Invalid generation parameters; the message names each field and what is allowed."""


def _frames_hint(n: int) -> str:
    lo = max(FRAMES_MIN, (n - 1) // 6 * 6 + 1)
    hi = lo + 6
    if lo == n:
        return ""
    if hi > FRAMES_MAX:
        return f"; nearest valid value is {lo}"
    return f"; nearest valid values are {lo} or {hi}"


class GenerationParams(BaseModel):
    """One video's parameters, with diffusers' own argument names. seed=None draws and records one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must be a non-empty string")
        return v

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
        if not GUIDANCE_MIN <= v <= GUIDANCE_MAX:
            raise ValueError(f"guidance_scale must be between {GUIDANCE_MIN} and {GUIDANCE_MAX}, got {v}")
        return v

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
        models = known_models()
        if v not in models:
            raise ValueError(f"model must be one of {', '.join(sorted(models))}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _prompt_tokens(self) -> "GenerationParams":
        # A T5 token covers at least one character, so only long prompts pay for the tokenizer.
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if len(text) < MAX_PROMPT_TOKENS:
                continue
            from mochi_lab.pipelines.tokens import count_tokens

            n = count_tokens(self.model, text)
            if n > MAX_PROMPT_TOKENS:
                raise ValueError(
                    f"{name} is {n} tokens for model {self.model!r}; the limit is {MAX_PROMPT_TOKENS} "
                    f"(the text encoder's max_sequence_length)"
                )
        return self

    @classmethod
    def parse(cls, prompt: str | None = None, **params: Any) -> "GenerationParams":
        """Validate, raising `ParamsError` with one line per bad field."""
        if prompt is not None:
            params["prompt"] = prompt
        try:
            return cls(**params)
        except ValidationError as exc:
            raise ParamsError(_describe(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "params"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown parameter; allowed: {', '.join(GenerationParams.model_fields)}"
        elif err["type"] == "missing":
            msg = "is required"
        lines.append(f"{field}: {msg}")
    return "invalid generation parameters:\n  " + "\n  ".join(lines)
