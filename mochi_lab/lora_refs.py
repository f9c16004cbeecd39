"""A job's LoRA adapters as its params name them (`GenerationParams.lora`): which adapters, at which scales, and
the sha256 of each file once the backend has resolved the names. The checks of a reference, and the words and
columns the views give it. Plain data: no torch, no files (`mochi_lab.adapters` keeps and checks the files).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# LoRA adapters per job, and the strength each may be applied with (0: not applied; negative: subtracted)
MAX_JOB_ADAPTERS = 4
LORA_SCALE_MIN, LORA_SCALE_MAX = -2.0, 2.0
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# An adapter's name names a file in the account's folder: no separators, no leading dot.
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def plain_number(v: Any) -> Any:
    """A number of a numeric type other than int and float (numpy's, Decimal) as an int or float; else `v`."""
    if isinstance(v, bool) or type(v) in (int, float) or not isinstance(v, numbers.Number):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def check_adapter_name(name: Any) -> str:
    """Raise ValueError unless `name` is an adapter's name: 1-64 letters, digits, '.', '_' or '-', first a letter
    or digit (it names a file in the account's folder: no separators, no leading dot)."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise ValueError(f"an adapter name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                         f"digit; got {name!r:.80}")
    return name


class LoraRef(BaseModel):
    """One adapter of a job: its name in the account, the scale it is applied at, and the sha256 of its file
    (filled in by the backend at submit: the result cache and the worker go by the file, not the name)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    scale: float = 1.0
    sha256: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_adapter_name(v)

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        v = plain_number(v)
        if isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, float) and not LORA_SCALE_MIN <= v <= LORA_SCALE_MAX:  # NaN fails this too
            raise ValueError(f"an adapter's scale is between {LORA_SCALE_MIN} and {LORA_SCALE_MAX}, got {v}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.fullmatch(v):
            raise ValueError(f"an adapter's sha256 is 64 lowercase hex digits, got {v!r:.80}")
        return v


def lora_refs(v: Any) -> tuple[Any, ...]:
    """`lora` as it may be given: None or "" (none), a name, or a list of names, (name, scale) pairs or
    {"name", "scale", "sha256"} objects (stored params, JSON); the entries as LoraRef's input."""
    if v is None or (isinstance(v, (str, tuple, list)) and len(v) == 0):
        return ()
    if isinstance(v, (str, LoraRef, Mapping)) or _is_pair(v):  # one adapter: a name, an object, a (name, scale)
        v = [v]
    if isinstance(v, bytes) or not isinstance(v, Iterable):
        raise ValueError(f"lora must be an adapter's name or a list of names or (name, scale) pairs, "
                         f"got {type(v).__name__} {v!r:.60}")
    out = []
    for item in v:
        if isinstance(item, str):
            item = {"name": item}
        elif isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ValueError(f"lora: a pair is (name, scale), got {item!r:.80}")
            item = {"name": item[0], "scale": item[1]}
        elif isinstance(item, LoraRef):
            item = item.model_dump()
        elif not isinstance(item, Mapping):
            raise ValueError(f"lora: an entry is a name, a (name, scale) pair or an object, got "
                             f"{type(item).__name__} {item!r:.60}")
        out.append(dict(item))
    if len(out) > MAX_JOB_ADAPTERS:
        raise ValueError(f"lora: at most {MAX_JOB_ADAPTERS} adapters per job, got {len(out)}")
    names = [i.get("name") for i in out]
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        raise ValueError(f"lora: each adapter at most once (give one scale), got {', '.join(twice)} twice")
    return tuple(out)


def _is_pair(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], str)
            and isinstance(plain_number(v[1]), (int, float)) and not isinstance(v[1], bool))


def lora_pairs(value: Any) -> list[tuple[str, float]]:
    """(name, scale) of each adapter of a `lora` value as params hold it (stored, validated or given), for
    views: never raises (a value that is no adapter list reads as none)."""
    try:
        refs = lora_refs(value)
    except (ValueError, TypeError):
        return []
    return [(str(r.get("name")), float(r.get("scale", 1.0))) for r in refs
            if isinstance(r.get("scale", 1.0), (int, float))]


def lora_label(value: Any) -> str:
    """A `lora` value as a label: "none", or each adapter with its scale ("style ×0.8, grain ×0.3")."""
    pairs = lora_pairs(value)
    return ", ".join(f"{name} \u00d7{scale:g}" for name, scale in pairs) if pairs else "none"


def lora_columns(value: Any) -> tuple[str | None, float | tuple[float, ...] | None]:
    """A `lora` value as two table columns: the adapters' names ("a+b"; None for none) and their scale (one
    number, or one per adapter)."""
    pairs = lora_pairs(value)
    if not pairs:
        return None, None
    scales = tuple(scale for _, scale in pairs)
    return "+".join(name for name, _ in pairs), scales[0] if len(scales) == 1 else scales


__all__ = ["LORA_SCALE_MAX", "LORA_SCALE_MIN", "MAX_JOB_ADAPTERS", "SHA256_RE", "LoraRef", "check_adapter_name",
           "lora_columns", "lora_label", "lora_pairs", "lora_refs", "plain_number"]
