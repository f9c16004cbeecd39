"""A record's values as display text, never assuming a type: the store is a trust boundary, so any field may
hold any JSON value (a string where a number belongs, a list where a mapping does, markup anywhere).

A number where a number belongs is formatted; anything else is shown as text, which the templates escape.
A record is read by duck typing (`field`): a `JobRecord`, or any object or mapping with its field names.
Every view of a job (`display.reprs`, `display.progress`, `display.notes`, the widgets) reads records here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def to_int(value: Any, default: int | None = None) -> int | None:
    """`value` as an int when it is a finite number (floats truncate), else `default`."""
    return int(value) if is_number(value) else default


def to_float(value: Any, default: float | None = None) -> float | None:
    return float(value) if is_number(value) else default


def text(value: Any, missing: str = "-") -> str:
    """Any value as display text: None is `missing`, everything else `str()` (templates escape it)."""
    return missing if value is None else str(value)


def num(value: Any, spec: str = "", missing: str = "-") -> str:
    """A number formatted with `spec`; anything that is not a finite number is shown as text."""
    if is_number(value):
        try:
            return format(value, spec)
        except ValueError:  # e.g. ".2f" is fine for ints, "d" is not for floats
            return str(value)
    return text(value, missing)


def seconds(value: Any) -> str:
    s = to_float(value)
    if s is None:
        return text(value)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


def gib(value: Any) -> str:
    n = to_float(value)
    return text(value) if n is None else f"{n / 2**30:.2f} GiB"


def when(value: Any) -> str:
    """A timestamp as local time, with the date only when it is not today."""
    t = to_float(value)
    if t is None:
        return text(value or None)
    if not t:
        return "-"
    try:
        lt, now = time.localtime(t), time.localtime()
    except (OverflowError, OSError, ValueError):
        return str(value)
    return time.strftime("%H:%M:%S" if lt[:3] == now[:3] else "%Y-%m-%d %H:%M", lt)


def short(value: Any, n: int = 80) -> str:
    s = text(value, "")
    return s if len(s) <= n else s[: n - 1] + "…"


def adapters(value: Any) -> str | None:
    """A job's stored `lora` (a list of {"name", "scale", "sha256"}) as its adapters by name and scale, as
    `mochi_lab.lora_refs.lora_label` words them ("style ×0.8, grain ×0.3"); None for a job without any. Another
    value is shown as its text, never dropped."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(e, Mapping) for e in value):
        return text(value)
    return ", ".join(f"{text(e.get('name'))} \u00d7{num(e.get('scale', 1.0), 'g')}" for e in value)


def mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a mapping, else an empty one (a hostile record may hold a list or a string)."""
    return value if isinstance(value, Mapping) else {}


def strings(value: Any) -> list[str]:
    """A list of display strings from a list (tags), a lone value, or nothing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return [text(v) for v in value]
    return [text(value)]


def field(record: Any, name: str, default: Any = None) -> Any:
    """A record field by attribute (JobRecord) or key (a mapping); `default` when it has none."""
    if isinstance(record, Mapping):
        return record.get(name, default)
    try:
        return getattr(record, name, default)
    except Exception:  # a property that raises: the view shows the default
        return default


def basename(value: Any) -> str:
    return text(value, "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


__all__ = ["basename", "field", "gib", "is_number", "mapping", "num", "seconds", "short", "strings", "text", "to_float",
           "to_int", "when"]
