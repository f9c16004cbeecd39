"""The gateway: the multi-user JupyterHub service (`mochi-lab gateway`). The app and its API (`app`), the
web page and sign-in (`web`), and JupyterHub authentication (`auth`).

`mochi_lab.gateway` was the app's module: its names still resolve here for one release, with a warning.
"""

from __future__ import annotations

from mochi_lab._moved import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {})
