"""Views of an experiment's runs: rows, a DataFrame, a live HTML table, a video grid played in sync,
and an export folder.

Functions of (runs, jobs) snapshots, so they do no store I/O of their own; pandas and anywidget
are imported on first use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from mochi_lab.display.reprs import render
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
        rows.append({"run": run.key, "job_id": facts.get("id"), "status": facts.get("status", "missing"),
                     "stage": facts.get("stage"), "attempt": run.attempt,
                     **{f: run.params.get(f) for f in PARAM_COLUMNS},
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


def _short(value: Any, n: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= n else text[: n - 1] + "…"


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

    Columns are the params that differ between the runs (seed has its own), then seed, status with the
    step progress of a running job, and run time."""
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
            "values": [_short(p.get(k)) for k in keys], "titles": [str(p.get(k)) for k in keys],
            "seed": p.get("seed"), "status": status, "stage": view.get("stage"), "step": view.get("step"),
            "total": view.get("total"), "progress": view.get("progress"), "running": status == "running",
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


# -- the compare grid ------------------------------------------------------------------------------
def grid_axes(runs: list[Run], rows: str | list[str] | None = None,
              columns: str | None = None) -> tuple[list[str], str | None]:
    """Which params label the rows and which one the columns.

    By default the innermost param that differs (in GenerationParams order: seed before fps) runs across
    and the others label the rows; one differing param with more than 6 values runs down instead.
    Any differing param left out of both is added to the rows, so no two runs share a cell."""
    keys = varying_params(runs)
    for name in ([rows] if isinstance(rows, str) else list(rows or [])) + ([columns] if columns else []):
        if name not in GenerationParams.model_fields:
            raise ValueError(f"{name!r} is not a generation parameter")
    if columns is None and rows is None:
        if not keys:
            return [], None
        if len(keys) == 1:
            values = {json.dumps(r.params.get(keys[0]), default=str) for r in runs}
            return ([], keys[0]) if len(values) <= 6 else (keys, None)
        return keys[:-1], keys[-1]
    row_keys = [rows] if isinstance(rows, str) else list(rows or [])
    if columns is None:
        rest = [k for k in keys if k not in row_keys]
        columns = rest[-1] if rest else None
    if rows is None:
        row_keys = [k for k in keys if k != columns]
    row_keys += [k for k in keys if k not in row_keys and k != columns]
    return row_keys, columns


def _axis_label(params: dict[str, Any], keys: list[str]) -> str:
    if len(keys) == 1:
        return _short(params.get(keys[0]), 60)
    return ", ".join(f"{k}={_short(params.get(k), 40)}" for k in keys)


def compare_grid(runs: list[Run], jobs: dict[str, JobRecord | None], *, video: Callable[[str], bytes],
                 rows: str | list[str] | None = None, columns: str | None = None, width: int = 256,
                 thumbnail: Callable[[str], bytes] | None = None, download_dir: str | Path | None = None):
    """A grid of the runs' videos with row and column headers for the swept params, played in sync
    from one play/pause/scrub control (a small anywidget: the browser drives every <video>).

    `video(job_id)` returns a done job's MP4 bytes, `thumbnail(job_id)` its PNG (each video's poster). A run
    without a video shows its status. Each video is also copied to `download_dir` (default: beside the
    notebook, as the Studio's cards do), so the grid's static stand-in links posters to their videos."""
    from mochi_lab.display.links import download_dir as default_download_dir
    from mochi_lab.display.links import relative_href
    from mochi_lab.display.reprs import thumbnail_uri

    folder = Path(download_dir) if download_dir is not None else default_download_dir()
    row_keys, col_key = grid_axes(runs, rows, columns)
    row_ids: dict[str, int] = {}  # a row's / column's full values -> its index (labels may be shortened)
    col_ids: dict[str, int] = {}
    row_labels: list[str] = []
    col_labels: list[str] = []
    cells = []
    videos: list[bytes] = []
    for run in runs:
        row_id = json.dumps([run.params.get(k) for k in row_keys], default=str)
        col_id = json.dumps(run.params.get(col_key) if col_key else None, default=str)
        if row_keys and row_id not in row_ids:
            row_ids[row_id] = len(row_labels)
            row_labels.append(_axis_label(run.params, row_keys))
        if col_key and col_id not in col_ids:
            col_ids[col_id] = len(col_labels)
            col_labels.append(_axis_label(run.params, [col_key]))
        job = jobs.get(run.key)
        status = job.status if job is not None else "missing"
        index, poster, href = -1, None, None
        if job is not None and job.status == DONE and "video" in job.artifacts:
            try:
                videos.append(bytes(video(job.id)))
                index = len(videos) - 1
            except (FileNotFoundError, KeyError):  # deleted since the snapshot
                status = "deleted"
            else:
                poster = _poster(thumbnail, job.id, thumbnail_uri)
                href = _copy_beside(folder, job.id, videos[index], relative_href)
        elif status == DONE:
            status = "no video"
        w, h = run.params.get("width"), run.params.get("height")
        cells.append({
            "row": row_ids[row_id] if row_keys else 0,
            "col": col_ids[col_id] if col_key else 0,
            "status": str(status), "video": index, "job_id": str(job.id) if job is not None else "",
            "title": json.dumps(run.params, default=str),
            "aspect": (h / w) if isinstance(w, int) and isinstance(h, int) and w > 0 else 9 / 16,
            "poster": poster or "", "href": href or "",
        })
    grid = compare_widget()(
        row_param=", ".join(row_keys), col_param=col_key or "", row_labels=row_labels, col_labels=col_labels,
        cells=cells, videos=videos, width=int(width),
    )
    grid.made_at = time.time()
    return grid


def _poster(thumbnail: Callable[[str], bytes] | None, job_id: str, to_uri: Callable[[Any], str | None]) -> str | None:
    """A done job's thumbnail as a small data: URI (None where there is none)."""
    if thumbnail is None:
        return None
    try:
        return to_uri(thumbnail(job_id))
    except (FileNotFoundError, KeyError):  # no thumbnail: the cell shows none
        return None


def _copy_beside(folder: Path, job_id: str, data: bytes, href: Callable[[Path], str]) -> str | None:
    """A copy of a video beside the notebook (kept if already there), as a relative link; None where it
    cannot be written."""
    dest = folder / f"{job_id}.mp4".replace("/", "_")
    try:
        if not dest.is_file() or dest.stat().st_size != len(data):
            folder.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    except OSError:  # a read-only folder: the live grid plays anyway, the saved one shows posters unlinked
        return None
    return href(dest)


_COMPARE_ESM = r"""
function make(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;  // text only: labels come from data
  return node;
}

function render({ model, el }) {
  const root = make("div", "mochi-compare");
  const bar = make("div", "mochi-compare-bar");
  const button = make("button", "mochi-compare-play jupyter-button");  // styled as the widgets' buttons
  button.type = "button";
  const scrub = make("input", "mochi-compare-scrub");
  Object.assign(scrub, { type: "range", min: "0", max: "1000", step: "1", value: "0" });
  const clock = make("span", "mochi-compare-time", "0.0 / 0.0 s");
  bar.append(button, scrub, clock);

  const rows = model.get("row_labels"), cols = model.get("col_labels"), cells = model.get("cells");
  const buffers = model.get("videos"), width = model.get("width");
  const table = make("table", "mochi-compare-grid");
  if (cols.length || rows.length) {  // the corner names the params: rows down, columns across
    const head = make("tr");
    const across = cols.length ? model.get("col_param") + " \u2192" : "";
    if (rows.length) head.append(make("th", "mochi-corner", model.get("row_param") + " \u2193  " + across));
    for (const c of cols) head.append(make("th", "mochi-col", c));
    const thead = make("thead");
    thead.append(head);
    table.append(thead);
  }
  const body = make("tbody");
  table.append(body);
  const at = new Map(cells.map((c) => [c.row + ":" + c.col, c]));
  const videos = [], urls = [];
  for (let r = 0; r < Math.max(rows.length, 1); r++) {
    const tr = make("tr");
    if (rows.length) tr.append(make("th", "mochi-row", rows[r]));
    for (let c = 0; c < Math.max(cols.length, 1); c++) {
      const td = make("td"), cell = at.get(r + ":" + c);
      if (cell && cell.video >= 0) {
        const v = make("video");
        const url = URL.createObjectURL(new Blob([buffers[cell.video]], { type: "video/mp4" }));
        urls.push(url);
        Object.assign(v, { src: url, muted: true, playsInline: true, preload: "auto", width: width, title: cell.title });
        if (cell.poster) v.poster = cell.poster;  // a data: URI the kernel built from the thumbnail
        v.dataset.job = cell.job_id;
        videos.push(v);
        td.append(v);
      } else if (cell) {
        const s = make("div", "mochi-status", cell.status);
        s.title = cell.title;
        Object.assign(s.style, { width: width + "px", height: Math.round(width * cell.aspect) + "px" });
        td.append(s);
      }
      tr.append(td);
    }
    body.append(tr);
  }
  root.append(bar, table);
  el.append(root);

  const length = (v) => (Number.isFinite(v.duration) ? v.duration : 0);
  const longest = () => videos.reduce((a, v) => (length(v) > length(a) ? v : a), videos[0]);
  const total = () => (videos.length ? length(longest()) : 0);
  let playing = false, dragging = false, resume = false, frame = 0;

  function seek(t) {
    for (const v of videos) v.currentTime = Math.min(t, Math.max(0, length(v) - 0.001));
  }
  function show(t) {
    const d = total();
    if (!dragging && d > 0) scrub.value = String(Math.round((t / d) * 1000));
    clock.textContent = t.toFixed(1) + " / " + d.toFixed(1) + " s";
  }
  function start() {
    playing = true;
    button.textContent = "\u275A\u275A pause";
    for (const v of videos) v.play().catch(() => {});
  }
  function stop() {
    playing = false;
    button.textContent = "\u25B6 play";
    for (const v of videos) v.pause();
    if (videos.length) seek(longest().currentTime);  // the same frame everywhere
  }
  function tick() {
    frame = requestAnimationFrame(tick);
    if (!videos.length) return;
    const lead = longest(), d = length(lead);
    let t = lead.currentTime;
    if (playing && !dragging) {
      if (lead.ended || (d > 0 && t >= d - 0.03)) {  // one loop for all: back to the start together
        seek(0);
        t = 0;
      }
      for (const v of videos) {
        if (v === lead || t < length(v) - 0.03) {
          if (v.paused) v.play().catch(() => {});
          if (v !== lead && Math.abs(v.currentTime - t) > 0.08) v.currentTime = t;
        } else if (!v.paused) {
          v.pause();  // a shorter video holds its last frame until the loop
        }
      }
    }
    show(t);
  }

  button.addEventListener("click", () => {
    model.set("playing", !playing);
    model.save_changes();
  });
  scrub.addEventListener("input", () => {
    if (!dragging) resume = playing;
    dragging = true;
    if (playing) for (const v of videos) v.pause();
    const t = (Number(scrub.value) / 1000) * total();
    seek(t);
    show(t);
  });
  scrub.addEventListener("change", () => {
    dragging = false;
    if (resume) start();
  });
  const follow = () => (model.get("playing") ? start() : stop());
  model.on("change:playing", follow);
  button.disabled = scrub.disabled = videos.length === 0;
  follow();
  frame = requestAnimationFrame(tick);
  return () => {
    cancelAnimationFrame(frame);
    model.off("change:playing", follow);
    for (const v of videos) v.pause();
    for (const u of urls) URL.revokeObjectURL(u);
  };
}

export default { render };
"""

_COMPARE_CSS = """
.mochi-compare { font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px; color: var(--jp-ui-font-color1, #222); }
.mochi-compare-bar { display: flex; align-items: center; gap: 8px; margin: 2px 0 6px; }
.mochi-compare-bar button { width: auto; min-width: 84px; }
.mochi-compare-scrub { width: 320px; }
.mochi-compare-time { font-family: var(--jp-code-font-family, monospace); color: var(--jp-ui-font-color2, #888); }
.mochi-compare-grid { border-collapse: collapse; }
.mochi-compare-grid th { font-weight: 600; padding: 2px 8px; vertical-align: middle; text-align: left; max-width: 220px; }
.mochi-compare-grid th.mochi-col { text-align: center; }
.mochi-compare-grid th.mochi-corner { color: var(--jp-ui-font-color2, #888); font-weight: normal; }
.mochi-compare-grid td { padding: 3px; vertical-align: top; }
.mochi-compare-grid video { display: block; background: black; }
.mochi-compare .mochi-status { display: flex; align-items: center; justify-content: center; font-style: italic;
  background: var(--jp-layout-color2, #eee); color: var(--jp-ui-font-color2, #888); }
"""


@lru_cache(maxsize=None)
def compare_widget():
    """The grid's widget class, built on first use (anywidget comes with the `notebook` extra)."""
    try:
        import anywidget
    except ImportError as exc:  # a server without the notebook extra can still export and tabulate
        raise ImportError("exp.compare() needs anywidget: pip install 'mochi_lab[notebook]'") from exc
    import traitlets as t

    from mochi_lab.display.widgets.save_hook import StaticStandIn

    class CompareGrid(StaticStandIn, anywidget.AnyWidget):
        """Runs' videos in a grid with row and column headers, played together from one control.

        Labels and statuses are data, set as text in the browser (never parsed as HTML). `playing`
        is the shared play/pause state: set it here or press the button there. Saved with the save hook,
        the notebook keeps it as a grid of posters, each linked to its video's copy beside the notebook."""

        _live_text = "compare grid (live: needs its kernel)"
        made_at: float | None = None

        _esm = _COMPARE_ESM
        _css = _COMPARE_CSS
        row_param = t.Unicode("").tag(sync=True)
        col_param = t.Unicode("").tag(sync=True)
        row_labels = t.List(t.Unicode()).tag(sync=True)
        col_labels = t.List(t.Unicode()).tag(sync=True)
        cells = t.List(t.Dict()).tag(sync=True)
        videos = t.List(t.Bytes()).tag(sync=True)
        width = t.Int(256).tag(sync=True)
        playing = t.Bool(True).tag(sync=True)

        def static_html(self) -> str:
            """The grid as static HTML: posters linked to their videos, statuses where there is no video."""
            rows = []
            for r in range(max(len(self.row_labels), 1)):
                rows.append({"label": self.row_labels[r] if self.row_labels else None, "cells": [
                    next((x for x in self.cells if x["row"] == r and x["col"] == c), None)
                    for c in range(max(len(self.col_labels), 1))]})
            return render("experiment_grid.html", "snapshot", rows=rows, col_labels=list(self.col_labels),
                          row_param=self.row_param, col_param=self.col_param, width=self.width,
                          made_at=self.made_at, runs=len(self.cells))

        def cell(self, row: str, column: str) -> dict[str, Any] | None:
            """The cell at a row and a column label ("" where the grid has no such axis)."""
            r = self.row_labels.index(row) if self.row_labels else 0
            c = self.col_labels.index(column) if self.col_labels else 0
            return next((x for x in self.cells if x["row"] == r and x["col"] == c), None)

    return CompareGrid


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


__all__ = ["compare_grid", "compare_widget", "experiment_html", "export_runs", "grid_axes", "jobs_html",
           "dataframe_columns", "run_rows", "runs_dataframe", "runs_view"]
