"""`Studio`: a prompt form whose controls only offer valid values, and a card per generated job."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from mochi_lab.job import Job
from mochi_lab.params import (
    FPS_MAX, FPS_MIN, FRAMES_MAX, FRAMES_MIN, GUIDANCE_MAX, GUIDANCE_MIN, SEED_MAX, SIZE_MAX, SIZE_MIN,
    STEPS_MAX, STEPS_MIN, GenerationParams, ParamsError,
)
from mochi_lab.settings import known_models

from ._format import error_html
from ._poll import DEFAULT_INTERVAL_S
from .card_stack import CardStack, HasCardStack

if TYPE_CHECKING:
    from mochi_lab.client import MochiCluster

# Mochi needs num_frames = 6k+1 and sizes divisible by 16 (diffusers checks only 8): offer nothing else.
FRAME_CHOICES = list(range(FRAMES_MIN, FRAMES_MAX + 1, 6))
SIZE_CHOICES = list(range(SIZE_MIN, SIZE_MAX + 1, 16))
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
        self.height = W.Dropdown(options=SIZE_CHOICES, value=d["height"], description="height", style=_LABEL,
                                 layout=_layout())
        self.width = W.Dropdown(options=SIZE_CHOICES, value=d["width"], description="width", style=_LABEL,
                                layout=_layout())
        self.fps = W.BoundedIntText(value=d["fps"], min=FPS_MIN, max=FPS_MAX, description="fps", style=_LABEL,
                                    layout=_layout())
        self.steps = W.IntSlider(value=d["num_inference_steps"], min=STEPS_MIN, max=STEPS_MAX, description="steps",
                                 style=_LABEL, layout=_layout())
        self.guidance = W.BoundedFloatText(value=d["guidance_scale"], min=GUIDANCE_MIN, max=GUIDANCE_MAX, step=0.5,
                                           description="guidance", style=_LABEL, layout=_layout())
        self.random_seed = W.Checkbox(value=seed is None, description="random seed", indent=False)
        self.seed = W.BoundedIntText(value=0 if seed is None else seed, min=0, max=SEED_MAX, description="seed",
                                     disabled=seed is None, style=_LABEL, layout=_layout("220px"))
        self.random_seed.observe(lambda ch: setattr(self.seed, "disabled", ch["new"]), "value")
        self.model = W.Dropdown(options=sorted(known_models()), value=d["model"], description="model", style=_LABEL,
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
    def jobs(self) -> list[Job]:
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

    def submit(self) -> Job | None:
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
            self.error.value = (f"<span style='color:#888'>same parameters and seed as job <code>{job.id}</code>: "
                                "its result is reused (tick 'random seed' for a new video)</span>")
            return job
        self.error.value = ""
        self.stack.add(job)
        return job


def _field_defaults(model: str) -> dict[str, Any]:
    fields = GenerationParams.model_fields
    out = {name: f.default for name, f in fields.items() if name not in ("prompt", "seed")}
    out.update(seed=None, model=model)
    return out
