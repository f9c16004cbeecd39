"""The compare grid (`exp.compare()`): an experiment's videos in a grid with row and column headers for the swept
params, played in sync from one control (a small anywidget: the browser drives every <video>), and saved with
the notebook as posters linked to copies of the videos beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from mochi_lab.display.experiment import param_text
from mochi_lab.display.reprs import render
from mochi_lab.model import DONE, JobRecord
from mochi_lab.params import GenerationParams
from mochi_lab.sweep import Run, varying_params


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
        return param_text(keys[0], params.get(keys[0]), 60)
    return ", ".join(f"{k}={param_text(k, params.get(k), 40)}" for k in keys)


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


__all__ = ["compare_grid", "compare_widget", "grid_axes"]
