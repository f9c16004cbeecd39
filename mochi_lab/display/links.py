"""Download links beside the notebook: where a done job's MP4 is copied, and the link to it. One rule for
the live view of a job (`display.live.media`) and a Studio's card (`widgets.job_card`)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from mochi_lab.config import ClientConfig


def download_dir() -> Path:
    """Where a displayed done job's MP4 is copied for its link: relative to the kernel's cwd, which
    JupyterLab sets to the notebook's folder (the server can only serve files under its root)."""
    return ClientConfig.from_env().download_dir


def relative_href(path: Path) -> str | None:
    """A link to `path` relative to the kernel's cwd (the notebook's folder), percent-encoded so no
    name can become a scheme; JupyterLab's HTML renderer (a text/html output, or an Output widget)
    resolves it against the notebook's folder and the server's base URL to the files/ route, which serves
    the bytes as video/mp4 (a path above the server's root cannot be served: the link then fails and the
    poster stays). None when there is no relative path (another drive)."""
    try:
        rel = Path(os.path.relpath(path))
    except ValueError:
        return None
    return None if rel.is_absolute() else "./" + quote(rel.as_posix())


__all__ = ["download_dir", "relative_href"]
