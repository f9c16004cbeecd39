"""`Studio`: a prompt form whose controls only offer valid values, and a card per generated job."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from mochi_lab import LIMITS, GenerationParams, ParamsError

from ._format import error_html, render
from ._poll import DEFAULT_INTERVAL_S
from .card_stack import CardStack, HasCardStack

if TYPE_CHECKING:
    from mochi_lab import Job, MochiCluster


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
# Mochi needs num_frames = 6k+1 and sizes divisible by 16 (diffusers checks only 8): offer nothing else.
FRAME_CHOICES = [n for n in range(FRAMES_MIN, FRAMES_MAX + 1) if n % 6 == 1]
HEIGHT_CHOICES = [n for n in range(HEIGHT_MIN, HEIGHT_MAX + 1) if n % 16 == 0]
WIDTH_CHOICES = [n for n in range(WIDTH_MIN, WIDTH_MAX + 1) if n % 16 == 0]
SIZE_CHOICES = HEIGHT_CHOICES  # the name older code imported
_LABEL = {"description_width": "110px"}


def _layout(width: str = "320px") -> W.Layout:
    return W.Layout(width=width)


class Studio(HasCardStack, W.VBox):
    """Write a prompt, pick parameters, press Generate; each job gets a live card below the form.

    Keyword arguments set the form's starting values (GenerationParams names), e.g.
    `Studio(cluster, num_frames=7, height=32, width=32, num_inference_steps=2)`.
    """

    def __init__(self, cluster: "MochiCluster", *, download_dir: str | Path | None = None,
                 interval: float = DEFAULT_INTERVAL_S, **defaults: Any):
        self.cluster = cluster
        d = {**_field_defaults(cluster.model), **defaults}
        seed = d.get("seed")
        self.prompt = W.Textarea(value=d.get("prompt", ""), placeholder="a cat surfing a wave, golden hour",
                                 description="prompt", style=_LABEL, layout=W.Layout(width="660px", height="60px"))
        self.negative_prompt = W.Text(value=d["negative_prompt"], description="negative prompt", style=_LABEL,
                                      layout=_layout("660px"))
        self.num_frames = W.Dropdown(options=FRAME_CHOICES, value=d["num_frames"], description="frames (6k+1)",
                                     style=_LABEL, layout=_layout())
        self.height = W.Dropdown(options=HEIGHT_CHOICES, value=d["height"], description="height", style=_LABEL,
                                 layout=_layout())
        self.width = W.Dropdown(options=WIDTH_CHOICES, value=d["width"], description="width", style=_LABEL,
                                layout=_layout())
        self.fps = W.BoundedIntText(value=d["fps"], min=FPS_MIN, max=FPS_MAX, description="fps", style=_LABEL,
                                    layout=_layout())
        self.steps = W.IntSlider(value=d["num_inference_steps"], min=STEPS_MIN, max=STEPS_MAX, description="steps",
                                 style=_LABEL, layout=_layout())
        self.guidance = W.BoundedFloatText(value=d["guidance_scale"], min=GUIDANCE_MIN, max=GUIDANCE_MAX, step=0.5,
                                           description="guidance", style=_LABEL, layout=_layout())
        self.random_seed = W.Checkbox(value=seed is None, description="random seed", indent=False)
        self.seed = W.BoundedIntText(value=SEED_MIN if seed is None else seed, min=SEED_MIN, max=SEED_MAX, description="seed",
                                     disabled=seed is None, style=_LABEL, layout=_layout("220px"))
        self.random_seed.observe(lambda ch: setattr(self.seed, "disabled", ch["new"]), "value")
        self.model = W.Dropdown(options=_models(cluster, d["model"]), value=d["model"], description="model", style=_LABEL,
                                layout=_layout())
        self.generate_button = W.Button(description="Generate", icon="play", button_style="primary")
        self.generate_button.on_click(lambda _: self.submit())
        self.error = W.HTML()
        self.stack = CardStack(download_dir=Path(download_dir) if download_dir else None, interval=interval)
        form = W.VBox([
            self.prompt, self.negative_prompt,
            W.HBox([W.VBox([self.num_frames, self.height, self.width, self.fps], layout=_layout("340px")),
                    W.VBox([self.steps, self.guidance, W.HBox([self.seed, self.random_seed]), self.model],
                           layout=_layout("340px"))]),
            W.HBox([self.generate_button]), self.error,
        ])
        super().__init__([form, self.stack])
        self.add_class("mochi-studio")

    @property
    def jobs(self) -> "list[Job]":
        """Jobs started here, newest first."""
        return self.stack.jobs

    @property
    def cards(self):
        return self.stack.cards

    def params(self) -> dict[str, Any]:
        """The form as GenerationParams keyword arguments (seed None: the cluster draws and records one)."""
        return {
            "prompt": self.prompt.value,
            "negative_prompt": self.negative_prompt.value,
            "num_frames": self.num_frames.value,
            "height": self.height.value,
            "width": self.width.value,
            "num_inference_steps": self.steps.value,
            "guidance_scale": self.guidance.value,
            "seed": None if self.random_seed.value else self.seed.value,
            "fps": self.fps.value,
            "model": self.model.value,
        }

    def submit(self) -> "Job | None":
        """Queue one job from the form (what Generate does). Returns at once; the card follows the job."""
        params = self.params()
        try:
            job = self.cluster.generate(params.pop("prompt"), **params)
        except ParamsError as exc:
            self.error.value = error_html(str(exc))
            return None
        except Exception as exc:  # a store or cluster error must not vanish into the kernel log
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
            return None
        if job.id in {j.id for j in self.stack.jobs}:
            # The cluster's result cache hands back the job that already has these exact params.
            self.error.value = render("studio.html", "reused", job_id=job.id)
            return job
        self.error.value = ""
        self.stack.add(job)
        return job


def _field_defaults(model: str) -> dict[str, Any]:
    fields = GenerationParams.model_fields
    out = {name: f.default for name, f in fields.items() if name not in ("prompt", "seed")}
    out.update(seed=None, model=model)
    return out


def _models(cluster: "MochiCluster", default: str) -> list[str]:
    """The models the cluster serves (the default first if the cluster forgot it), as dropdown labels."""
    try:
        models = [str(m) for m in cluster.models()]
    except Exception:  # an old or unreachable backend: offer the default only
        models = []
    return sorted(set(models) | {str(default)})
