"""The site's pictures: screenshots and plots that the tests write under artifacts/, copied into docs/assets/.

Nobody draws or edits these by hand. The e2e tests write them (Chromium screenshots in artifacts/browser/,
the autoscaling timeline in artifacts/); after such a run,

    python docs/pictures.py            # copy every picture below into docs/assets/screenshots/
    python docs/pictures.py --check    # fail if a picture is missing from docs/assets/screenshots/

and commit the copies. tests/test_docs.py checks that every picture here is in docs/ and referenced by a
page, and that every picture in docs/assets/screenshots/ is listed here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
DEST = REPO / "docs" / "assets" / "screenshots"

# picture -> (where the test writes it, relative to artifacts/; the test that writes it)
PICTURES: dict[str, tuple[str, str]] = {
    "ux_studio_live.png": ("browser/ux_studio_live.png", "tests/browser/test_notebook_ux_jobs.py"),
    "ux_studio_field_error.png": ("browser/ux_studio_field_error.png", "tests/browser/test_notebook_ux_jobs.py"),
    "gateway_page.png": ("browser/gateway_page.png", "tests/gateway/test_page_browser.py"),
    "gateway_page_preview.png": ("browser/gateway_page_preview.png", "tests/gateway/test_page_browser.py"),
    "gateway_docs.png": ("browser/gateway_docs.png", "tests/gateway/test_page_browser.py"),
    "quickstart.png": ("browser/quickstart.png", "tests/browser/test_quickstart_browser.py"),
    "history.png": ("browser/history.png", "tests/browser/test_notebook_ux_panels.py"),
    "history_reopened.png": ("browser/history_reopened.png", "tests/browser/test_notebook_ux_panels.py"),
    "cluster_panel.png": ("browser/cluster_panel.png", "tests/browser/test_notebook_ux_panels.py"),
    "experiment.png": ("browser/experiment.png", "tests/browser/test_notebook_ux_panels.py"),
    "compare.png": ("browser/compare.png", "tests/browser/test_notebook_ux_panels.py"),
    "ux_reopened_without_kernel.png": ("browser/ux_reopened_without_kernel.png", "tests/browser/test_notebook_ux_jobs.py"),
    "autoscaling_timeline.png": ("autoscaling_timeline.png", "tests/pool/test_autoscaling.py"),
}
# Written by the tests too, and worth showing once a run produces them (add each here and to its page):
# browser/ux_studio_queue.png, ux_job_outputs_live.png (tests/browser/test_notebook_ux_jobs.py).


def copy() -> list[str]:
    """Copy every picture the tests have written; returns the ones not found under artifacts/."""
    DEST.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, (source, _test) in PICTURES.items():
        src = ARTIFACTS / source
        if src.is_file():
            shutil.copyfile(src, DEST / name)
        else:
            missing.append(f"{name}: no {src.relative_to(REPO)} (run {PICTURES[name][1]})")
    return missing


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        missing = [name for name in PICTURES if not (DEST / name).is_file()]
    else:
        missing = copy()
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
