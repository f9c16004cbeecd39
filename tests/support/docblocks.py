"""Run a page's fenced Python blocks in order, in one namespace, as a reader would type them.

A top-level expression whose last line ends in `# => VALUE` is checked: it must equal VALUE (a Python
literal). Every `# =>` on the page must be such a check, so none is silently ignored. `replace` swaps exact
lines before running (the fast tier gives the tutorial the session's cheap pool instead of starting Ray);
each must occur exactly once.

    python tests/support/docblocks.py docs/tutorial/index.md     # run a page verbatim
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXPECT = "# => "


def blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def run(page: Path, namespace: dict[str, Any] | None = None, replace: dict[str, str] | None = None) -> int:
    """Run every block of `page`; returns how many `# =>` checks passed. Raises on the first failure."""
    sources = blocks(page)
    if not sources:
        raise AssertionError(f"{page}: no ```python blocks")
    for old, new in (replace or {}).items():
        found = sum(s.splitlines().count(old) for s in sources)
        if found != 1:
            raise AssertionError(f"{page}: the line {old!r} occurs {found} times, not once")
        sources = [re.sub(rf"^{re.escape(old)}$", new, s, flags=re.MULTILINE) for s in sources]
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    checks = 0
    for n, source in enumerate(sources, 1):
        where = f"{page} block {n}"
        lines = source.splitlines()
        tree = ast.parse(source, where)
        for stmt in tree.body:
            last = lines[stmt.end_lineno - 1]
            code = ast.Module([stmt], type_ignores=[])
            if isinstance(stmt, ast.Expr) and EXPECT in last:
                want = ast.literal_eval(last.split(EXPECT, 1)[1].strip())
                got = eval(compile(ast.Expression(stmt.value), where, "eval"), namespace)
                if got != want:
                    text = ast.get_source_segment(source, stmt)
                    raise AssertionError(f"{where}: {text} gave {got!r}, the page says {want!r}")
                checks += 1
            else:
                exec(compile(code, where, "exec"), namespace)  # noqa: S102  (running the page is the point)
        written = sum(line.count(EXPECT) for line in lines)
        if written != sum(1 for s in tree.body if isinstance(s, ast.Expr) and EXPECT in lines[s.end_lineno - 1]):
            raise AssertionError(f"{where}: a `{EXPECT.strip()}` that is not at the end of a top-level expression")
    return checks


if __name__ == "__main__":
    print(f"{run(Path(sys.argv[1]))} checks passed")
