"""Views of an experiment's runs: rows, a DataFrame, a side-by-side video grid and an export folder.

Functions of (runs, jobs) snapshots, so they do no store I/O of their own; pandas and ipywidgets
are imported on first use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from collections.abc import Callable

from mochi_lab.params import GenerationParams
from mochi_lab.reprs import render
from mochi_lab.store.base import DONE, JobRecord
from mochi_lab.sweep import Run, varying_params

TIMINGS = ("queue_s", "load_s", "text_s", "denoise_s", "decode_s", "encode_s", "run_s")
_TIMES = ("created_at", "started_at", "finished_at")


def run_rows(runs: list[Run], jobs: dict[str, JobRecord | None]) -> list[dict[str, Any]]:
    """Plain dicts, one per run, with every column present (None where a run has no value yet)."""
    rows = []
    for run in runs:
        job = jobs.get(run.key)
        row: dict[str, Any] = {"run": run.key, "job_id": job.id if job else None,
                               "status": job.status if job else "missing", "stage": job.stage if job else None,
                               "attempt": run.attempt}
        row.update({f: run.params.get(f) for f in GenerationParams.model_fields})
        timings = job.timings if job else {}
        row.update({t: timings.get(t) for t in TIMINGS})
        row.update({t: getattr(job, t) if job else None for t in _TIMES})
        artifacts = job.artifacts if job else {}
        row.update(video=artifacts.get("video"), thumbnail=artifacts.get("thumbnail"),
                   worker_id=job.worker_id if job else None, error=job.error if job else None)
        rows.append(row)
    return rows


def runs_dataframe(runs: list[Run], jobs: dict[str, JobRecord | None]):
    import pandas as pd

    rows = run_rows(runs, jobs)
    columns = list(rows[0]) if rows else list(run_rows([Run("", {})], {})[0])
    df = pd.DataFrame(rows, columns=columns)
    for col in TIMINGS:
        df[col] = pd.to_numeric(df[col])
    for col in _TIMES:  # datetimes make "runs since ..." and durations one-liners
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


def _label(run: Run, keys: list[str]) -> str:
    def show(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{k}={show(run.params.get(k))}" for k in keys) or run.key


def compare_grid(runs: list[Run], jobs: dict[str, JobRecord | None], *, video: Callable[[str], bytes],
                 columns: int | None = None, width: int = 256):
    """A GridBox: one cell per run, video (or its status) under a label of the params that differ.

    `video(job_id)` returns a done job's MP4 bytes."""
    import ipywidgets as w

    keys = varying_params(runs)
    if columns is None:
        # one row per value of the outer params: the innermost differing param runs across
        inner = {json.dumps(r.params.get(keys[-1]), default=str) for r in runs} if keys else set()
        columns = len(inner) if 1 < len(inner) <= 6 else min(4, max(1, len(runs)))
    cells = []
    for run in runs:
        job = jobs.get(run.key)
        label = _label(run, keys)
        head = w.HTML(render("experiment_grid.html", "label", label=label, title=json.dumps(run.params, default=str)))
        if job is not None and job.status == DONE and "video" in job.artifacts:
            body = w.Video(value=video(job.id), format="mp4", autoplay=True, loop=True, controls=True,
                           layout=w.Layout(width=f"{width}px"))
        else:
            status = job.status if job is not None else "missing"
            body = w.HTML(render("experiment_grid.html", "status", status=status), layout=w.Layout(width=f"{width}px"))
        cells.append(w.VBox([head, body]))
    return w.GridBox(cells, layout=w.Layout(grid_template_columns=f"repeat({columns}, {width + 8}px)",
                                            grid_gap="8px"))


def export_runs(record: dict[str, Any], runs: list[Run], jobs: dict[str, JobRecord | None], folder: str | Path,
                *, save: Callable[[str, Path], Path]) -> Path:
    """Copy done videos as `<index>_<run>.mp4` (`save(job_id, dest)`) and write manifest.json and manifest.csv."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = run_rows(runs, jobs)
    for i, row in enumerate(rows):
        row["file"] = None
        if row["status"] == DONE and row["video"]:
            name = f"{i:03d}_{row['run']}.mp4"
            try:
                save(row["job_id"], folder / name)
            except FileNotFoundError:  # deleted since the snapshot
                continue
            row["file"] = name
    manifest = {
        "experiment": {k: record.get(k) for k in ("name", "account", "description", "tags", "created_at")},
        "exported_at": time.time(),
        "varying": varying_params(runs),
        "runs": rows,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


__all__ = ["compare_grid", "export_runs", "run_rows", "runs_dataframe"]
