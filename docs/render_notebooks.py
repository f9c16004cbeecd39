"""The site's example notebooks, with the outputs of a real run: each of notebooks/*.ipynb executed top to bottom
and written to docs/notebooks/, where the site renders it.

Nobody edits these outputs by hand. A notebook runs in a fresh kernel with the environment nbval gives it in the
test suite (notebooks/conftest.py's `kernel_env`: the embedded default, its own data dir, the tiny model), its
**Checks** cell included: a cell that fails writes nothing. The live widgets' outputs are then turned into their
static stand-ins exactly as the save hook does when a notebook is saved in JupyterLab
(`mochi_lab.display.widgets.save_hook.strip_live_widgets`), so the page shows each widget's last state.

    python docs/render_notebooks.py               # run and write every notebook (about a minute each on a CPU)
    python docs/render_notebooks.py 02_prompt_sweep
    python docs/render_notebooks.py --check       # fail if a rendered notebook is missing, failed or stale

and commit the results. Each rendered notebook records the sha256 of its source's cells, so a change to a
notebook that is not rendered again fails `--check` (tests/test_docs.py runs it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import mimetypes
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "notebooks"
DEST = REPO / "docs" / "notebooks"
CELL_TIMEOUT_S = 300  # as nbval's --nbval-cell-timeout in pyproject's addopts
LINK = re.compile(r'(src|href)="([^"]+)"')


def sources_sha256(nb: dict[str, Any]) -> str:
    """A notebook's cells as a reader sees them (type and source), whatever their outputs."""
    cells = [[c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]]
             for c in nb["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def _nbval_conftest() -> Any:
    # notebooks/conftest.py, which holds the kernel environment the nbval run uses (not a package: loaded by path)
    spec = importlib.util.spec_from_file_location("_notebooks_conftest", SOURCES / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def embed_videos(nb: Any, kernel_dir: Path, videos: Path) -> int:
    """Make the HTML outputs' links to the run's videos (relative to the kernel's folder, into a temporary
    download folder) data URIs, so the page plays them wherever it is served; returns how many."""
    count = 0

    def inline(match: re.Match) -> str:
        nonlocal count
        target = (kernel_dir / match[2]).resolve()
        if not target.is_file() or not target.is_relative_to(videos.resolve()):
            return match[0]
        count += 1
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return f'{match[1]}="data:{kind};base64,{base64.b64encode(target.read_bytes()).decode()}"'

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html")
            if html is not None:
                output["data"]["text/html"] = LINK.sub(inline, html if isinstance(html, str) else "".join(html))
    return count


def render(name: str) -> Path:
    """Execute notebooks/NAME.ipynb and write docs/notebooks/NAME.ipynb; raises if any cell fails."""
    import nbformat
    from nbclient import NotebookClient

    from mochi_lab.display.widgets.save_hook import strip_live_widgets
    from mochi_lab.version import __version__

    source = SOURCES / f"{name}.ipynb"
    nb = nbformat.read(source, as_version=4)
    conftest = _nbval_conftest()
    env = conftest.kernel_env(source)
    saved = dict(os.environ)
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(SOURCES)}}).execute()
        strip_live_widgets(nb)
        embed_videos(nb, SOURCES, Path(env["MOCHI_LAB_DOWNLOAD_DIR"]))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(conftest._ROOT, ignore_errors=True)
    nb.metadata.pop("widgets", None)  # the live widgets' state: they are left out, their stand-ins stay
    nb.metadata["mochi_lab"] = {"rendered_from": f"notebooks/{source.name}", "sources_sha256": sources_sha256(nb),
                                "mochi_lab_version": __version__}
    DEST.mkdir(parents=True, exist_ok=True)
    out = DEST / source.name
    if out.is_symlink():
        out.unlink()
    nbformat.write(nb, out)
    return out


def problems(sources: Path = SOURCES, dest: Path = DEST) -> list[str]:
    """What is wrong with the rendered notebooks: missing, stale (its source changed since), or not a whole
    clean run (a code cell not executed, an error output, a live widget left in, a link to a file that only
    the run's machine had)."""
    found = []
    for source in sorted(sources.glob("*.ipynb")):
        out = dest / source.name
        if not out.is_file() or out.is_symlink():
            found.append(f"docs/notebooks/{out.name}: not rendered")
            continue
        nb, src = json.loads(out.read_text()), json.loads(source.read_text())
        meta = nb.get("metadata", {}).get("mochi_lab", {})
        if meta.get("sources_sha256") != sources_sha256(src) or sources_sha256(nb) != sources_sha256(src):
            found.append(f"docs/notebooks/{out.name}: stale (notebooks/{source.name} changed since it was rendered)")
            continue
        counts = []
        for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
            counts.append(cell.get("execution_count"))
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    found.append(f"docs/notebooks/{out.name}: code cell {i + 1} failed")
                if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                    found.append(f"docs/notebooks/{out.name}: code cell {i + 1} holds a live widget")
                html = output.get("data", {}).get("text/html", "")
                local = [url for _, url in LINK.findall(html if isinstance(html, str) else "".join(html))
                         if not url.startswith(("data:", "https:", "http:", "#"))]
                if local:
                    found.append(f"docs/notebooks/{out.name}: code cell {i + 1} links to a file of its run: {local[0]}")
        if counts != list(range(1, len(counts) + 1)):
            found.append(f"docs/notebooks/{out.name}: not one run top to bottom (execution counts {counts})")
    return found


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        found = problems()
        for line in found:
            print(f"{line}; run: python docs/render_notebooks.py", file=sys.stderr)
        return 1 if found else 0
    names = argv or [p.stem for p in sorted(SOURCES.glob("*.ipynb"))]
    for name in names:
        print(f"rendered {render(name).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
