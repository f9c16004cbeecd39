"""The pool: the Ray side around the workers. The pool driver (`driver`: named actors, one per GPU), gangs,
the pool controller, metrics, the local runtime's daemon and its reaper.

`mochi_lab.pool` was the driver's module: its names still resolve here for one release, with a warning.
"""

from __future__ import annotations

from mochi_lab._moved import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {})
