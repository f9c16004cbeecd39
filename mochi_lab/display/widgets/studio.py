"""`Studio`: a prompt form and a card per generated job.

The form offers size presets (and a custom size), the length in seconds or in frames (either may be
typed; the other follows, seconds snapped to Mochi's 6k+1 frames), the models the pool's workers serve,
one of the account's LoRA adapters (none by default) at a scale, and defaults that suit the pool: small and few steps on CPU workers, Mochi's defaults on GPUs. A typed
value that is not allowed is shown as an error next to its field, in the form's own words (its labels),
and Generate stays disabled until it is fixed: no value is silently clamped. Generate is also disabled
while a submission is in flight; a notice (a reused job, the backend's refusal) clears when the form changes.

What the fields offer, start at and allow is `studio_fields`; this module is the widget: the form's layout,
its two length fields kept in step, Generate and the submission, and the cards below.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from mochi_lab.params import ParamsError

from ._format import error_html, render
from ._poll import DEFAULT_INTERVAL_S
from .card_stack import CardStack, HasCardStack
from .save_hook import StaticStandIn
from .studio_fields import (
    CUSTOM,
    FIELD_OF,
    FIELDS,
    NO_ADAPTER,
    SEED_MIN,
    SIZE_PRESETS,
    adapter_choices,
    as_number,
    device_of,
    duration_of,
    error_lines,
    field_defaults,
    field_error_html,
    form_errors,
    model_choices,
    positive,
    snap_frames,
    worker_rows,
)

if TYPE_CHECKING:
    from mochi_lab.client.cluster import MochiCluster
    from mochi_lab.client.job import Job

INVALID_TOOLTIP = "fix the fields marked in red first"
_LABEL = {"description_width": "110px"}


def _layout(width: str = "320px") -> W.Layout:
    return W.Layout(width=width)


def _adapter_default(value: Any) -> tuple[str | None, float]:
    """The adapter menu's starting name and scale from a `lora=` default: none, a name, or (name, scale)."""
    if isinstance(value, str) and value:
        return value, 1.0
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str):
        return value[0], float(value[1])
    return NO_ADAPTER[1], 1.0


class Studio(StaticStandIn, HasCardStack, W.VBox):
    """Write a prompt, pick parameters, press Generate; each job gets a live card below the form.

    Keyword arguments set the form's starting values (GenerationParams names), e.g.
    `Studio(cluster, num_frames=7, height=32, width=32, num_inference_steps=2)`; the rest follow the
    pool's device. `lora` starts the adapter menu at one of the account's adapters: a name, or (name, scale).
    """

    def __init__(self, cluster: "MochiCluster", *, download_dir: str | Path | None = None,
                 interval: float = DEFAULT_INTERVAL_S, **defaults: Any):
        self.cluster = cluster
        rows = worker_rows(cluster)
        self.device = device_of(cluster, rows)
        d = {**field_defaults(cluster.model, self.device), **defaults}
        seed = d.get("seed")
        self.prompt = W.Textarea(value=d.get("prompt", ""), placeholder="a cat surfing a wave, golden hour",
                                 description="prompt", style=_LABEL, layout=W.Layout(width="660px", height="60px"))
        self.negative_prompt = W.Text(value=d["negative_prompt"], description="negative prompt", style=_LABEL,
                                      layout=_layout("660px"))
        size = (d["width"], d["height"])
        presets = {v: label for label, v in SIZE_PRESETS}
        self.size = W.Dropdown(options=SIZE_PRESETS, value=size if size in presets else CUSTOM, description="size",
                               style=_LABEL, layout=_layout())
        self.width = W.IntText(value=d["width"], description="width", style=_LABEL, layout=_layout("220px"))
        self.height = W.IntText(value=d["height"], description="height", style=_LABEL, layout=_layout("220px"))
        self.custom_size = W.VBox([self.width, self.height])
        self.fps = W.IntText(value=d["fps"], description="fps", style=_LABEL, layout=_layout())
        fps = d["fps"] if isinstance(d["fps"], int) and d["fps"] > 0 else 1
        # The length, in either unit: typing one sets the other (seconds snap to 6k+1 frames).
        self.duration = W.FloatText(value=duration_of(d["num_frames"], fps), step=0.5, description="duration (s)",
                                    style=_LABEL, layout=_layout("220px"))
        self.frames = W.IntText(value=d["num_frames"], step=6, description="frames", style=_LABEL,
                                layout=_layout("220px"))
        self.frames_hint = W.HTML(render("studio.html", "frames_hint"))
        self._syncing = False  # set while one length field is written from the other
        self.steps = W.IntText(value=d["num_inference_steps"], description="steps", style=_LABEL, layout=_layout())
        self.guidance = W.FloatText(value=d["guidance_scale"], step=0.5, description="guidance", style=_LABEL,
                                    layout=_layout())
        self.random_seed = W.Checkbox(value=seed is None, description="random seed", indent=False)
        self.seed = W.IntText(value=SEED_MIN if seed is None else seed, description="seed", disabled=seed is None,
                              style=_LABEL, layout=_layout("220px"))
        self.random_seed.observe(lambda ch: setattr(self.seed, "disabled", ch["new"]), "value")
        models = model_choices(cluster, d["model"], rows, asked="model" in defaults)
        self.model = W.Dropdown(options=models, value=d["model"] if d["model"] in models else models[0],
                                description="model", style=_LABEL, layout=_layout())
        lora, scale = _adapter_default(d.get("lora"))
        adapters = adapter_choices(cluster, lora)
        self.lora = W.Dropdown(options=adapters, value=lora, description="LoRA", style=_LABEL, layout=_layout())
        self.lora_scale = W.FloatText(value=scale, step=0.1, description="LoRA scale", disabled=lora is None,
                                      style=_LABEL, layout=_layout("220px"))
        self.lora.observe(lambda ch: setattr(self.lora_scale, "disabled", ch["new"] is None), "value")
        self.field_errors = {name: W.HTML(layout=_layout("370px")) for name in FIELDS}
        self.invalid = False  # a field shows an error: Generate waits for it to be fixed
        self.generate_button = W.Button(description="Generate", icon="play", button_style="primary")
        self.generate_button.on_click(lambda _: self._clicked())
        self.clear_button = W.Button(description="Clear finished", icon="broom",
                                     tooltip="remove the cards of jobs that have ended (the jobs stay in History)")
        self.clear_button.on_click(lambda _: self.stack.clear_finished())
        self.error = W.HTML()  # errors that belong to no field, and notices
        self.stack = CardStack(download_dir=Path(download_dir) if download_dir else None, interval=interval)
        self.stack.on_change = self._snapshot_changed
        self.submitting = False
        self._submission: asyncio.Task | None = None
        self._attempted = False  # the prompt is checked once a submission was tried
        self._snapshots: list[Any] = []  # display handles of this Studio's static stand-ins

        def row(*parts: W.Widget, error: str) -> W.VBox:
            return W.VBox([W.HBox(list(parts)), self.field_errors[error]])

        form = W.VBox([
            row(self.prompt, error="prompt"), row(self.negative_prompt, error="negative_prompt"),
            W.HBox([
                W.VBox([row(self.size, error="size"), self.custom_size, row(self.fps, error="fps"),
                        row(self.duration, error="duration"), row(self.frames, self.frames_hint, error="num_frames")],
                       layout=_layout("380px")),
                W.VBox([row(self.steps, error="num_inference_steps"), row(self.guidance, error="guidance_scale"),
                        row(self.seed, self.random_seed, error="seed"), row(self.model, error="model"),
                        row(self.lora, error="lora"), self.lora_scale],
                       layout=_layout("380px")),
            ]),
            W.HBox([self.generate_button, self.clear_button]), self.error,
        ])
        super().__init__([form, self.stack])
        self.add_class("mochi-studio")
        self.size.observe(self._size_picked, "value")
        self.duration.observe(self._duration_typed, "value")
        self.frames.observe(self._frames_typed, "value")
        self.fps.observe(self._fps_typed, "value")
        for w in (self.width, self.height, self.fps, self.duration, self.frames, self.steps, self.guidance, self.seed,
                  self.random_seed, self.model, self.negative_prompt, self.prompt, self.lora, self.lora_scale):
            w.observe(lambda _: self._changed(), "value")
        self._size_picked()
        self.check()

    @property
    def jobs(self) -> "list[Job]":
        """Jobs started here, newest first."""
        return self.stack.jobs

    @property
    def cards(self):
        return self.stack.cards

    # -- the form ----------------------------------------------------------------
    def _size_picked(self, _change: Any = None) -> None:
        choice = self.size.value
        custom = choice == CUSTOM
        if not custom:
            self.width.value, self.height.value = choice
        self.custom_size.layout.display = None if custom else "none"

    def _sync(self, widget: W.Widget, value: Any) -> None:
        """Write one length field from the other without the write being taken for typing."""
        self._syncing = True
        try:
            widget.value = value
        finally:
            self._syncing = False

    def _duration_typed(self, _change: Any = None) -> None:
        d, fps = self.duration.value, self.fps.value
        if self._syncing or not positive(d) or not (isinstance(fps, int) and fps > 0):
            return
        self._sync(self.frames, snap_frames(d, fps))

    def _frames_typed(self, _change: Any = None) -> None:
        n, fps = self.frames.value, self.fps.value
        if self._syncing or not (isinstance(n, int) and n > 0) or not (isinstance(fps, int) and fps > 0):
            return
        self._sync(self.duration, duration_of(n, fps))

    def _fps_typed(self, _change: Any = None) -> None:
        # the frames stay (they decide the cost); the seconds they last at the new fps follow
        self._frames_typed()

    @property
    def num_frames(self) -> int | None:
        """The frames field (which a typed duration sets, snapped to 6k+1); None while it is not a number."""
        n = self.frames.value
        return n if isinstance(n, int) else None

    def _changed(self) -> None:
        """Any edit: the last notice is stale, and the form is checked again."""
        self.error.value = ""
        self.check()

    def params(self) -> dict[str, Any]:
        """The form as GenerationParams keyword arguments (seed None: the cluster draws and records one)."""
        return {
            "prompt": self.prompt.value,
            "negative_prompt": self.negative_prompt.value,
            "num_frames": self.num_frames,
            "height": as_number(self.height.value, integer=True),
            "width": as_number(self.width.value, integer=True),
            "num_inference_steps": as_number(self.steps.value, integer=True),
            "guidance_scale": float(self.guidance.value),
            "seed": None if self.random_seed.value else as_number(self.seed.value, integer=True),
            "fps": as_number(self.fps.value, integer=True),
            "model": self.model.value,
            "lora": None if self.lora.value is None else [(self.lora.value, as_number(self.lora_scale.value,
                                                                                       integer=False))],
        }

    def check(self) -> dict[str, str]:
        """Check the form as typed and show each problem next to its field; returns {field: error}.

        The prompt is checked only once a submission was tried (an empty form is not an error)."""
        errors = form_errors(self.params(), self.duration.value, attempted=self._attempted)
        for name, box in self.field_errors.items():
            box.value = field_error_html(errors.pop(name)) if name in errors else ""
        self._other_errors = errors  # fields the form has no place for (the general error line shows them)
        shown = {name: box.value for name, box in self.field_errors.items() if box.value}
        self.invalid = bool(shown or errors)
        self._enable()
        return shown

    def _enable(self) -> None:
        """Generate is usable when no submission is in flight and no field shows an error."""
        self.generate_button.disabled = self.submitting or self.invalid
        self.generate_button.tooltip = INVALID_TOOLTIP if self.invalid and not self.submitting else ""

    # -- submitting ----------------------------------------------------------------
    def _clicked(self) -> None:
        """Generate: in a kernel, submit without blocking it (the button is disabled until it is queued)."""
        if self.submitting:
            return  # a click that was on its way while the button was disabled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a test): submit at once
            self.submit()
            return
        prepared = self._prepare()
        if prepared is None:
            return
        self._busy(True)
        self._submission = loop.create_task(self._submit_async(*prepared))

    async def _submit_async(self, prompt: str, params: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            job = await loop.run_in_executor(None, lambda: self.cluster.generate(prompt, **params))
        except Exception as exc:
            self._failed(exc)
        else:
            self._accept(job)
        finally:
            self._busy(False)

    def _busy(self, busy: bool) -> None:
        self.submitting = busy
        self._enable()
        self.generate_button.description = "Submitting…" if busy else "Generate"
        self.generate_button.icon = "spinner" if busy else "play"

    def _prepare(self) -> tuple[str, dict[str, Any]] | None:
        """Clear the last attempt's errors and check the form; the params to submit, or None (errors shown)."""
        self._attempted = True
        self.error.value = ""
        errors = self.check()
        if errors or self._other_errors:
            if self._other_errors:
                self.error.value = field_error_html([line for lines in self._other_errors.values() for line in lines])
            return None
        params = self.params()
        return params.pop("prompt"), params

    def submit(self) -> "Job | None":
        """Queue one job from the form (what Generate does). Returns at once; the card follows the job.

        Returns None, with the errors next to their fields, when the form is not valid."""
        if self.submitting:
            return None
        prepared = self._prepare()
        if prepared is None:
            return None
        self._busy(True)
        try:
            job = self.cluster.generate(prepared[0], **prepared[1])
        except Exception as exc:
            self._failed(exc)
            return None
        finally:
            self._busy(False)
        return self._accept(job)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ParamsError):  # the backend's own checks (the pool's models, admission, tokens)
            shown = False
            for name, line in error_lines(str(exc)):
                box = self.field_errors.get(FIELD_OF.get(name, name))
                if box is not None:
                    box.value = field_error_html([line])
                    shown = True
                else:
                    self.error.value = field_error_html([line])
                    shown = True
            if not shown:
                self.error.value = field_error_html([str(exc)])
        else:  # a store or cluster error must not vanish into the kernel log
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")

    def _accept(self, job: "Job") -> "Job":
        if job.id in {j.id for j in self.stack.jobs}:
            # The cluster's result cache hands back the job that already has these exact params.
            self.error.value = render("studio.html", "reused", job_id=job.id)
            return job
        self.error.value = ""
        self.stack.add(job)
        return job

    async def wait(self, timeout: float | None = None) -> None:
        """Await a submission in flight, then the jobs started here, without blocking the kernel."""
        if self._submission is not None and not self._submission.done():
            await asyncio.wait_for(asyncio.shield(self._submission), timeout)
        await self.stack.wait(timeout)

    # -- the notebook file -----------------------------------------------------------
    _live_text = "Studio (live: needs its kernel)"

    def static_html(self) -> str:
        """This Studio's jobs as static HTML, each one's last state: what a notebook saved with the
        save hook (mochi_lab.display.widgets.save_hook) shows when it is opened without its kernel."""
        return render("studio_snapshot.html", cards=[c.static_view() for c in self.stack.cards])

