"""Views of an experiment's runs: rows, a DataFrame, a live HTML table and an export folder (the video grid
played in sync is display/compare.py).

Functions of (runs, jobs) snapshots, so they do no store I/O of their own; pandas is imported on first
use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mochi_lab._moved import moved_names
from mochi_lab.display.reprs import render
from mochi_lab.lora_refs import lora_columns, lora_label
from mochi_lab.model import DONE, PARAM_COLUMNS, TIMINGS, JobRecord, job_row
from mochi_lab.params import GenerationParams
from mochi_lab.sweep import Run, varying_params

_TIMES = ("created_at", "started_at", "finished_at")
_RESULTS = (*TIMINGS, *_TIMES, "video", "thumbnail", "worker_id", "error")  # a run's job's, from `job_row`


def run_rows(runs: list[Run], jobs: dict[str, JobRecord | None]) -> list[dict[str, Any]]:
    """Plain dicts, one per run, with every column present (None where a run has no value yet): the run's key,
    its params and attempt, and its job's columns (`model.job_row`)."""
    rows = []
    for run in runs:
        job = jobs.get(run.key)
        facts = job_row(job) if job else {}
        lora, lora_scale = lora_columns(run.params.get("lora"))
        rows.append({"run": run.key, "job_id": facts.get("id"), "status": facts.get("status", "missing"),
                     "stage": facts.get("stage"), "attempt": run.attempt,
                     **{f: run.params.get(f) for f in PARAM_COLUMNS}, "lora": lora, "lora_scale": lora_scale,
                     **{c: facts.get(c) for c in _RESULTS}})
    return rows


FIRST_COLUMNS = ("seed", "status", "run_s")  # after the swept params: what a reader looks at first
# The results, after the swept params and the seed: what each run came to. `video` is the MP4's path (a
# gateway route on a gateway), `error` why a run failed, `job_id` the job that made it (`cluster.job(id)`).
RESULT_COLUMNS = ("status", "run_s", "video", "error", "job_id")
# The run's columns named for what they are: `run` in run_rows is the run's key in the experiment (the
# hash of its params), `attempt` how many times `resume` re-queued it, `stage` its job's last stage.
RENAMED = {"run": "run_key", "attempt": "run_attempt", "stage": "job_stage"}


def dataframe_columns(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(the default columns, every column) of `runs_dataframe`, in order."""
    varied = [k for k in varying_params(runs) if k not in FIRST_COLUMNS]
    if "lora" in varied:  # by adapter and by scale: what a LoRA sweep is read by
        varied.insert(varied.index("lora") + 1, "lora_scale")
    first = varied + ["seed", *RESULT_COLUMNS]
    every = [RENAMED.get(c, c) for c in run_rows([Run("", {})], {})[0]]
    return first, first + [c for c in every if c not in first]


def runs_dataframe(runs: list[Run], jobs: dict[str, JobRecord | None], columns: list[str] | None = None,
                   all_columns: bool = False):
    """One row per run: the swept params, then the seed and the results (status, run time `run_s` in
    seconds, the video's path, the error, the job's id). `all_columns=True` adds the rest: the run's key
    (`run_key`) and `run_attempt`, the job's last stage (`job_stage`), the params that did not vary, the
    per-stage timings (`*_s`), the times (UTC datetimes), the thumbnail's path and the worker.
    `columns` picks columns by name, in the order given."""
    import pandas as pd

    first, every = dataframe_columns(runs)
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise ValueError(f"columns must be a list of column names, got {columns!r:.80}")
        unknown = [c for c in columns if c not in every]
        if unknown:
            raise ValueError(f"unknown columns {', '.join(map(repr, unknown))}; the columns are {', '.join(every)}")
        chosen = list(columns)
    else:
        chosen = every if all_columns else first
    rows = [{RENAMED.get(k, k): v for k, v in row.items()} for row in run_rows(runs, jobs)]
    df = pd.DataFrame(rows, columns=every)
    for col in TIMINGS:
        df[col] = pd.to_numeric(df[col])
    for col in _TIMES:  # datetimes make "runs since ..." and durations one-liners
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df[chosen]


# -- the live table (`exp` and the list `exp.sweep()` returns, displayed) --------------------------
TABLE_ROWS = 50  # rows drawn; the rest are counted
_FINISHED = ("done", "failed", "cancelled")


def short(value: Any, n: int = 40) -> str:
    """A value as text of at most `n` characters (an ellipsis where it was cut)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


def param_text(name: str, value: Any, n: int = 40) -> str:
    """A param's value as a table or grid shows it: `short`, and adapters by name and scale ("style ×0.8")."""
    return short(lora_label(value) if name == "lora" else value, n)


def eta_s(jobs: list[JobRecord | None]) -> float | None:
    """Seconds until the queued and running runs are done: the running jobs' own ETAs (they run side by
    side), then the queued ones at the done runs' mean run time, spread over as many workers as are busy
    now. None when runs wait and none is done yet (no basis); 0 when nothing waits or runs."""
    jobs = [j for j in jobs if j is not None]
    running = [j for j in jobs if j.status == "running"]
    queued = sum(1 for j in jobs if j.status == "queued")
    if not running and not queued:
        return 0.0
    took = [j.timings["run_s"] for j in jobs if j.status == "done" and j.timings.get("run_s")]
    if queued and not took:
        return None
    left = max((float(j.live["eta_s"]) for j in running if (j.live or {}).get("eta_s") is not None), default=0.0)
    return left + (queued * sum(took) / len(took) / max(1, len(running)) if queued else 0.0)


def runs_view(items: list[tuple[dict[str, Any], JobRecord | None]], *, missing: str = "missing") -> dict[str, Any]:
    """The facts of a run table: (params, job or None) pairs in, plain values out (the template escapes them).

    Columns are the params that differ between the runs (seed has its own), then seed, status with a running
    job's progress as every view of it shows it (`display.progress.progress_view`), and run time."""
    from mochi_lab.display.reprs import job_view

    params = [p for p, _ in items]
    keys = [f for f in GenerationParams.model_fields if f != "seed"
            and len({json.dumps(p.get(f), sort_keys=True, default=str) for p in params}) > 1]
    counts: dict[str, int] = {}
    rows = []
    for p, job in items:
        status = missing if job is None else job.status if isinstance(job.status, str) else str(job.status)
        counts[status] = counts.get(status, 0) + 1
        view = job_view(job) if job is not None else {}
        rows.append({
            "values": [param_text(k, p.get(k)) for k in keys], "titles": [param_text(k, p.get(k), 400) for k in keys],
            "seed": p.get("seed"), "status": status, "stage": view.get("stage"), "step": view.get("step"),
            "total": view.get("total"), "bar": view.get("bar"), "running": status == "running",
            "run_s": view.get("run_s"), "id": job.id if job is not None else None,
            "error": job.error if job is not None else None,
        })
    finished = sum(n for s, n in counts.items() if s in _FINISHED)
    failed = [r for r in rows if r["status"] == "failed"]
    order = ["done", "running", "queued", "failed", "cancelled", missing]
    return {
        "keys": keys, "rows": rows[:TABLE_ROWS], "more": max(0, len(rows) - TABLE_ROWS), "total": len(rows),
        "eta_s": eta_s([job for _, job in items]),
        # failures called out above the table, with the first one's error (the rows may be past TABLE_ROWS)
        "failed": len(failed), "first_error": next((r["error"] for r in failed if r["error"]), None),
        "finished": finished, "counts": sorted(counts.items(), key=lambda kv: (order.index(kv[0])
                                                                              if kv[0] in order else 99, kv[0])),
    }


def experiment_html(record: dict[str, Any], runs: list[Run], jobs: dict[str, JobRecord | None]) -> str:
    """The experiment as a compact table, each run's status read when this is called."""
    view = runs_view([(run.params, jobs.get(run.key)) for run in runs])
    tags = record.get("tags")
    head = {"name": record.get("name"), "description": record.get("description"),
            "tags": [str(t) for t in tags] if isinstance(tags, list) else []}
    return render("experiment.html", "table", head=head, v=view, title="Experiment")


def jobs_html(experiment: str, items: list[tuple[dict[str, Any], JobRecord | None]]) -> str:
    """A list of an experiment's jobs (what `sweep()` returned) as the same table; a deleted job shows as such."""
    view = runs_view(items, missing="deleted")
    return render("experiment.html", "table", head={"name": experiment}, v=view, title="Jobs of experiment")


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


# The compare grid had its home here (display/compare.py).
__getattr__ = moved_names(__name__)

__all__ = ["dataframe_columns", "eta_s", "experiment_html", "export_runs", "jobs_html", "run_rows", "runs_dataframe",
           "runs_view", "short"]
