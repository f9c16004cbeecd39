"""Small helpers shared by the widgets (no widget state here).

Plain text for Labels comes from here; HTML comes only from the autoescaping templates, through
`mochi_lab.display.reprs.render`. The number helpers never assume a type: the store is a trust boundary,
and a record may hold a string where a number belongs.
"""

from __future__ import annotations

from mochi_lab.display.reprs import error_html, job_view, render
from mochi_lab.display.values import mapping, seconds, to_float, to_int

__all__ = ["error_html", "job_view", "mapping", "render", "seconds", "to_float", "to_int"]
