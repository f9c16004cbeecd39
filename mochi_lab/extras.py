"""Which pyproject extra brings which packages: `pip install mochi_lab` is the thin client (talk to a gateway),
and what runs jobs, serves them or draws them in a notebook comes with an extra. A feature whose extra is
missing says which packages and which extra, instead of a bare ModuleNotFoundError from deep inside.
"""

from __future__ import annotations

import importlib.util


class MissingExtra(ImportError):
    """A feature's packages are not installed: the message names them and the extra that brings them."""


def require(purpose: str, extra: str, *modules: str, hint: str = "") -> None:
    """Raise MissingExtra unless every one of `modules` can be imported (found, not imported: this is cheap)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{purpose} needs {', '.join(missing)}, not installed here: "
                           f"pip install 'mochi_lab[{extra}]'{hint}", name=missing[0])


__all__ = ["MissingExtra", "require"]
