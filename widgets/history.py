"""`History`: the account's jobs as a table with thumbnails; filter, play, re-run and delete."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import ipywidgets as W

from mochi_lab import DONE, STATUSES
from mochi_lab.reprs import BORDER

from ._format import error_html, job_view, mapping, render, to_float
from ._poll import DEFAULT_INTERVAL_S
from .card_stack import CardStack, HasCardStack

if TYPE_CHECKING:
    import pandas as pd

    from mochi_lab import Job, MochiCluster

_BUTTON = W.Layout(width="84px")


class HistoryRow(W.HBox):
    """One job: thumbnail, facts, and Play / Re-run / Delete (Delete asks for a second click)."""

    def __init__(self, job: "Job", thumbnail: bytes | None, on: dict[str, Callable[["Job"], None]]):
        self.job = job
        r = job.record
        self.thumbnail = (W.Image(value=thumbnail, format="png", width="64px") if thumbnail
                          else W.HTML(render("history.html", "no_thumbnail")))
        self.info = W.HTML(render("history.html", "row", r=job_view(r)), layout=W.Layout(width="560px"))
        self.play_button = W.Button(description="Play", icon="play", disabled=r.status != DONE, layout=_BUTTON)
        self.rerun_button = W.Button(description="Re-run", icon="redo", layout=_BUTTON)
        self.delete_button = W.Button(description="Delete", icon="trash", layout=_BUTTON)
        self.play_button.on_click(lambda _: on["play"](job))
        self.rerun_button.on_click(lambda _: on["rerun"](job))
        self.delete_button.on_click(lambda _: self._delete(on["delete"]))
        self.armed = False
        super().__init__([self.thumbnail, self.info, self.play_button, self.rerun_button, self.delete_button],
                         layout=W.Layout(align_items="center", border_bottom=f"1px solid {BORDER}"))
        self.add_class("mochi-history-row")

    def _delete(self, delete: Callable[["Job"], None]) -> None:
        # Deleting removes the MP4 too: the first click only arms the button.
        if not self.armed:
            self.armed = True
            self.delete_button.description, self.delete_button.button_style = "Confirm", "danger"
            return
        delete(self.job)


class History(HasCardStack, W.VBox):
    """Newest first, `limit` rows a page. Filters re-list at once; re-runs get live cards below."""

    def __init__(self, cluster: "MochiCluster", *, status: str | None = None, text: str = "",
                 experiment: str = "", limit: int = 20, download_dir: str | Path | None = None,
                 interval: float = DEFAULT_INTERVAL_S):
        self.cluster = cluster
        self.limit = limit
        self.offset = 0
        self._thumbs: dict[str, bytes] = {}  # job id -> PNG bytes, so paging does not re-read files
        self.status = W.Dropdown(options=[("all", None)] + [(s, s) for s in STATUSES], value=status,
                                 description="status", layout=W.Layout(width="180px"),
                                 style={"description_width": "45px"})
        self.text = W.Text(value=text, placeholder="prompt contains…", continuous_update=False,
                           layout=W.Layout(width="220px"))
        self.experiment = W.Combobox(value=experiment, placeholder="experiment", continuous_update=False,
                                     ensure_option=False, layout=W.Layout(width="160px"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=_BUTTON)
        self.prev_button = W.Button(description="◀", layout=W.Layout(width="40px"))
        self.next_button = W.Button(description="▶", layout=W.Layout(width="40px"))
        self.page = W.Label()
        self.error = W.HTML()
        self.table = W.VBox()
        self.player = W.VBox()
        self.playing: str | None = None  # id of the job in the player
        self.stack = CardStack(download_dir=Path(download_dir) if download_dir else None, interval=interval,
                               on_finish=lambda _: self.refresh())
        for w in (self.status, self.text, self.experiment):
            w.observe(lambda _: self._first_page(), "value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.prev_button.on_click(lambda _: self._turn(-1))
        self.next_button.on_click(lambda _: self._turn(+1))
        bar = W.HBox([self.status, self.text, self.experiment, self.refresh_button, self.prev_button, self.page,
                      self.next_button])
        super().__init__([bar, self.error, self.table, self.player, self.stack])
        self.add_class("mochi-history")
        self.refresh()

    @property
    def rows(self) -> list[HistoryRow]:
        return list(self.table.children)

    def refresh(self) -> None:
        """List the current page under the current filters (one store query plus new thumbnails)."""
        try:
            jobs = self.cluster.jobs(status=self.status.value, experiment=self.experiment.value or None,
                                     text=self.text.value or None, limit=self.limit + 1, offset=self.offset)
        except Exception as exc:
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
            return
        self.error.value = ""
        self.experiment.options = self._experiment_names()
        more = len(jobs) > self.limit
        jobs = jobs[: self.limit]
        on = {"play": self.play, "rerun": self.rerun, "delete": self.delete}
        self.table.children = [HistoryRow(j, self._thumbnail(j), on) for j in jobs]
        if not jobs:
            self.table.children = [W.HTML(render("history.html", "empty"))]
        self.page.value = f"{self.offset + 1}–{self.offset + len(jobs)}" if jobs else "0"
        self.prev_button.disabled = self.offset == 0
        self.next_button.disabled = not more

    def play(self, job: "Job") -> None:
        r = job.record
        try:
            video = job.video  # raises unless done
        except Exception as exc:  # deleted meanwhile, or not done
            self.error.value = error_html(f"cannot play {r.id}: {type(exc).__name__}: {exc}")
            return
        self.error.value = ""
        self.playing = r.id
        self.player.children = [W.HTML(render("history.html", "caption", r=job_view(r))), video]

    def rerun(self, job: "Job") -> "Job | None":
        """Queue the same params again, seed included (bypassing the result cache): the same video again."""
        try:
            new = job.reproduce()
        except Exception as exc:
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
            return None
        self.stack.add(new)
        self.refresh()
        return new

    def delete(self, job: "Job") -> None:
        try:
            self.cluster.delete(job.id)
        except Exception as exc:
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
        self._thumbs.pop(job.id, None)
        if self.playing == job.id:
            self.player.children, self.playing = [], None
        self.refresh()

    def dataframe(self) -> "pd.DataFrame":
        """The rows on this page as a DataFrame (see `jobs_frame`)."""
        return jobs_frame(row.job for row in self.rows if isinstance(row, HistoryRow))

    def _first_page(self) -> None:
        self.offset = 0
        self.refresh()

    def _turn(self, direction: int) -> None:
        self.offset = max(0, self.offset + direction * self.limit)
        self.refresh()

    def _experiment_names(self) -> list[str]:
        try:
            return [str(e.name) for e in self.cluster.experiments()]
        except Exception:  # suggestions only: the filter still takes any typed name
            return []

    def _thumbnail(self, job: "Job") -> bytes | None:
        if job.id not in self._thumbs:
            try:
                thumb = job.thumbnail  # PNG bytes from the backend, or None
            except Exception:  # deleted meanwhile, or unreachable: the row shows a placeholder
                return None
            if not thumb:
                return None
            self._thumbs[job.id] = bytes(thumb)
        return self._thumbs.get(job.id)


def jobs_frame(jobs: Iterable["Job"]) -> "pd.DataFrame":
    """Jobs as a DataFrame, one row each, from the records already read (no store I/O)."""
    import pandas as pd

    rows = []
    for j in jobs:
        r = j.record
        params = mapping(r.params)
        created = to_float(r.created_at)
        rows.append({
            "id": r.id, "created": pd.Timestamp(created, unit="s") if created is not None else pd.NaT,
            "status": r.status,
            **{k: params.get(k) for k in ("prompt", "num_frames", "height", "width", "num_inference_steps",
                                           "guidance_scale", "seed", "fps", "model")},
            "experiment": r.experiment, "tags": list(r.tags or ()), "run_s": mapping(r.timings).get("run_s"),
            "video": mapping(r.artifacts).get("video"), "error": r.error,
        })
    columns = ["id", "created", "status", "prompt", "num_frames", "height", "width", "num_inference_steps",
               "guidance_scale", "seed", "fps", "model", "experiment", "tags", "run_s", "video", "error"]
    return pd.DataFrame(rows, columns=columns)
