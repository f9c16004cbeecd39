"""`CancelControl`: a displayed job's Cancel button (`mochi_lab.display.live.LiveView`).

The job itself is shown as HTML only, so a notebook reopened without its kernel shows its last state. The
button is an ipywidgets Button in an output of its own, beside that HTML, while the job runs; when the job
ends (or the view closes) that output is replaced with empty HTML, so the notebook file holds no widget view
and never shows "Error displaying widget". Saved while the job runs, the button's output is marked for the save
hook (`save_hook.MARK`), which leaves it out of the file.
"""

from __future__ import annotations

from typing import Any, Callable

import ipywidgets as W

from mochi_lab.display.reprs import WIDGET_MIME

from .save_hook import MARK

Publish = Callable[[dict[str, Any], bool], None]
EMPTY = {"text/plain": "", "text/html": ""}


class CancelControl:
    """A Cancel button that calls `cancel()` once, shown (`show`) in an output of its own and taken away
    (`end`). `publish(bundle, update)` sends a bundle (IPython's display machinery by default; tests pass a
    recorder)."""

    def __init__(self, cancel: Callable[[], Any], publish: Publish | None = None) -> None:
        self._cancel = cancel
        self._publish = publish
        self._handle: Any = None
        self.shown = self.ended = False
        self.button = W.Button(description="Cancel", icon="stop", button_style="warning", tooltip="cancel this job",
                               layout=W.Layout(width="90px"))
        self.button.add_class("mochi-job-cancel")
        self.button.on_click(lambda _: self.click())

    def show(self) -> None:
        if self.shown or self.ended:
            return
        bundle = {WIDGET_MIME: self.button._repr_mimebundle_()[WIDGET_MIME], "text/plain": "Cancel (needs its kernel)"}
        self.shown = True
        if self._publish is not None:
            self._publish(bundle, False)
        else:
            from IPython.display import display

            self._handle = display(bundle, raw=True, display_id=True, metadata={MARK: {"live_widget": True}})

    def click(self) -> None:
        """Ask for the cancel (once); the job's view shows it settle."""
        if self.button.disabled or self.ended:
            return
        self.button.disabled, self.button.description = True, "Cancelling"
        self._cancel()

    def end(self) -> None:
        """Replace the button's output with empty HTML and close the button (the job has ended)."""
        if self.ended:
            return
        self.ended = True
        if self.shown:
            if self._publish is not None:
                self._publish(dict(EMPTY), True)
            elif self._handle is not None:
                self._handle.update(dict(EMPTY), raw=True)
        self.button.close()


__all__ = ["CancelControl"]
