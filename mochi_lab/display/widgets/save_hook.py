"""A Jupyter server pre-save hook: a notebook file keeps each mochi_lab widget's static stand-in, not
the live widget, so a notebook opened without its kernel shows the jobs' last states.

Why: JupyterLab renders a widget output with the widget renderer even when the output also has HTML,
and with no kernel (and no saved widget state) it shows "Error displaying widget: model not found".
So a live widget (the Studio) is displayed as two outputs: the widget, marked
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

from typing import Any

from mochi_lab.display.reprs import STATIC_MIME, WIDGET_MIME

MARK = "mochi_lab"


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


__all__ = ["pre_save", "strip_live_widgets"]
