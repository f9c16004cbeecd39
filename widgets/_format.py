"""Small text helpers shared by the widgets (no widget state here)."""

from __future__ import annotations

import html
import time
from typing import Any


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def when(t: float | None) -> str:
    """A timestamp as local time, with the date only when it is not today."""
    if not t:
        return "-"
    lt, now = time.localtime(t), time.localtime()
    fmt = "%H:%M:%S" if lt[:3] == now[:3] else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, lt)


def size(params: dict[str, Any]) -> str:
    """width x height, frames, steps: the facts that decide a video's cost."""
    return (
        f"{params.get('width')}x{params.get('height')} · {params.get('num_frames')} frames · "
        f"{params.get('num_inference_steps')} steps"
    )


def short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def error_html(error: str, traceback: str | None = None) -> str:
    """An error in red, with the traceback folded away (it is long and rarely the first thing needed)."""
    out = f'<pre style="color:#dc3545;white-space:pre-wrap;margin:2px 0">{html.escape(error)}</pre>'
    if traceback:
        out += ("<details><summary>traceback</summary>"
                f"<pre style='font-size:11px'>{html.escape(traceback)}</pre></details>")
    return out


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"
