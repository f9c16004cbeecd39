"""A Jupyter server pre-save hook: a notebook file keeps each mochi_lab widget's static stand-in, not
the live widget, so a notebook opened without its kernel shows the jobs' last states.

Why: JupyterLab renders a widget output with the widget renderer even when the output also has HTML,
and with no kernel (and no saved widget state) it shows "Error displaying widget: model not found".
So a live widget (the Studio, History, the ClusterPanel, an experiment's compare grid: `StaticStandIn`) is
displayed as two outputs: the widget, marked
`{"mochi_lab": {"live_widget": true}}` in its output metadata, and its static stand-in under
`mochi_lab.display.reprs.STATIC_MIME` (which front ends do not render), kept current through a display id.
When the notebook is saved, this hook leaves the marked widget outputs out of the file and turns the
stand-ins into text/html. The browser's copy of the notebook is not touched: the live widgets stay
on screen. Job outputs (`job` in a cell) are HTML already and need no hook.

Installing mochi_lab enables it in its environment's Jupyter server (pyproject's data files put
`etc/jupyter/jupyter_server_config.d/mochi_lab.json` under the prefix; setup.py makes editable installs do it
too). A server in another environment: `jupyter server extension enable mochi_lab.display.widgets.save_hook`, or in
jupyter_server_config.py `c.ServerApp.jpserver_extensions = {"mochi_lab.display.widgets.save_hook": True}`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME, render

MARK = "mochi_lab"
HOOK = "mochi_lab.display.widgets.save_hook"
ENABLE = f"jupyter server extension enable {HOOK}"
REFRESH_EVERY_S = 30.0  # a stand-in whose only change is its clock is sent again at most this often


def save_hook_enabled() -> bool | None:
    """Whether this environment's Jupyter config turns the hook on (the JSON files `jupyter server
    extension enable` and installing mochi_lab write; a higher-priority folder overrides a lower one).
    None when jupyter_core is not installed. A server in another environment has its own config: this
    is what a kernel can know, and a notebook server started here reads the same files."""
    try:
        from jupyter_core.paths import jupyter_config_path
    except ImportError:
        return None
    enabled = False
    for folder in reversed([Path(p) for p in jupyter_config_path()]):  # lowest priority first
        d = folder / "jupyter_server_config.d"
        files = [*(sorted(d.glob("*.json")) if d.is_dir() else []), folder / "jupyter_server_config.json"]
        for f in files:
            try:
                value = json.loads(f.read_text())["ServerApp"]["jpserver_extensions"][HOOK]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            enabled = bool(value)
    return enabled


class StaticStandIn:
    """For a live widget that leaves its last state in the notebook file: displayed, it is the widget
    (marked so the hook leaves it out of the file) and its static stand-in (`static_html`, which the hook
    turns into HTML). The widget calls `_snapshot_changed()` when what the stand-in shows changes.
    Where the hook is off, a third output says so and how to turn it on: without it the saved file shows
    "Error displaying widget: model not found" in place of the widget."""

    _live_text = "widget (live: needs its kernel)"

    def static_html(self) -> str:
        raise NotImplementedError

    def _snapshot_bundle(self) -> dict[str, Any]:
        return {"text/plain": "", STATIC_MIME: self.static_html()}

    def _snapshot_changed(self, *, clock_only: bool = False) -> None:
        """Send the stand-in again; `clock_only`: only its "as of" time moved, so at most every REFRESH_EVERY_S."""
        handles = self.__dict__.get("_snapshots") or []
        if not handles:
            return
        now = time.monotonic()
        if clock_only and now - self.__dict__.get("_snapshot_sent", 0.0) < REFRESH_EVERY_S:
            return
        self.__dict__["_snapshot_sent"] = now
        bundle = self._snapshot_bundle()
        for handle in handles:
            handle.update(bundle, raw=True)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        bundle = self._repr_mimebundle_()  # type: ignore[attr-defined]  (the widget's own)
        if isinstance(bundle, tuple):  # anywidget's is (data, metadata)
            bundle = bundle[0]
        live = {WIDGET_MIME: bundle[WIDGET_MIME], "text/plain": self._live_text}
        display(live, raw=True, metadata={MARK: {"live_widget": True}})
        self.__dict__.setdefault("_snapshots", []).append(
            display(self._snapshot_bundle(), raw=True, display_id=True))
        self.__dict__["_snapshot_sent"] = time.monotonic()
        if save_hook_enabled() is False:
            display({"text/plain": f"the mochi_lab save hook is off: {ENABLE}",
                     "text/html": render("_macros.html", "save_hook_off", enable=ENABLE)}, raw=True)


def strip_live_widgets(nb: Any) -> int:
    """Rewrite a notebook's JSON in place as described above; returns how many outputs changed."""
    changed = 0
    cells = nb.get("cells") if isinstance(nb, dict) else None
    for cell in cells if isinstance(cells, list) else ():
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        if not isinstance(outputs, list):
            continue
        kept = []
        for out in outputs:
            data = out.get("data") if isinstance(out, dict) else None
            meta = out.get("metadata") if isinstance(out, dict) else None
            mark = meta.get(MARK) if isinstance(meta, dict) else None
            if isinstance(data, dict) and isinstance(mark, dict) and mark.get("live_widget") and WIDGET_MIME in data:
                changed += 1
                continue  # the live widget: its stand-in follows it
            if isinstance(data, dict) and STATIC_MIME in data:
                html = data.pop(STATIC_MIME)
                data["text/html"] = html
                changed += 1
            kept.append(out)
        cell["outputs"] = kept
    return changed


def pre_save(model: dict[str, Any], **_kwargs: Any) -> None:
    """`ContentsManager.pre_save_hook`: applies `strip_live_widgets` to a notebook being saved."""
    if isinstance(model, dict) and model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        strip_live_widgets(model["content"])


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "mochi_lab.display.widgets.save_hook"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    serverapp.contents_manager.register_pre_save_hook(pre_save)
    serverapp.log.info("mochi_lab: notebooks are saved with static job views instead of live widgets")


__all__ = ["StaticStandIn", "pre_save", "save_hook_enabled", "strip_live_widgets"]
