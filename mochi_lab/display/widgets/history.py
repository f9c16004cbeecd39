"""`History`: the account's jobs as a table with thumbnails; filter, play, re-run and delete.

The player and a re-run's card open under the row they came from (each row has a `detail` area),
and stay there when the table is re-listed; a card whose row is no longer on the page moves below
the table, so it is never lost. A notebook saved with the save hook keeps the last listing as HTML
(thumbnails, and links to the videos copied beside the notebook: played ones and the cards' downloads).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import ipywidgets as W

from mochi_lab.display.links import download_dir as default_download_dir
from mochi_lab.display.links import relative_href
from mochi_lab.display.reprs import BORDER, thumbnail_uri
from mochi_lab.lora_refs import lora_columns
from mochi_lab.model import DONE, STATUSES, job_row

from ._format import error_html, job_view, render, to_float
from ._poll import DEFAULT_INTERVAL_S
from .card_stack import CardStack, HasCardStack
from .save_hook import StaticStandIn

if TYPE_CHECKING:
    import pandas as pd

    from mochi_lab.client.cluster import MochiCluster
    from mochi_lab.client.job import Job

ALL = "all"  # the status filter's "every status" choice (a None value would leave the dropdown blank)


def _button(description: str, icon: str) -> W.Button:
    # sized to their label: a fixed width cut "Re-run" and "Confirm" off next to their icons
    return W.Button(description=description, icon=icon, layout=W.Layout(width="auto", min_width="72px"))


class HistoryRow(W.VBox):
    """One job: thumbnail, facts, and Play / Re-run / Delete (Delete asks for a second click).

    `detail`, under the row, holds what the row opened: the player and re-run cards."""

    def __init__(self, job: "Job", thumbnail: tuple[bytes, str] | None, on: dict[str, Callable[["Job"], None]]):
        self.job = job
        r = job.record
        # a done job's thumbnail (png); an unfinished one's latest preview (webp), the video as it forms
        self.thumbnail = (W.Image(value=thumbnail[0], format=thumbnail[1], width="64px") if thumbnail
                          else W.HTML(render("history.html", "no_thumbnail")))
        self.info = W.HTML(render("history.html", "row", r=job_view(r)), layout=W.Layout(width="560px"))
        self.play_button = _button("Play", "play")
        self.play_button.disabled = r.status != DONE
        self.rerun_button = _button("Re-run", "redo")
        self.delete_button = _button("Delete", "trash")
        self.play_button.on_click(lambda _: on["play"](job))
        self.rerun_button.on_click(lambda _: on["rerun"](job))
        self.delete_button.on_click(lambda _: self._delete(on["delete"]))
        self.armed = False
        self.line = W.HBox([self.thumbnail, self.info, self.play_button, self.rerun_button, self.delete_button],
                           layout=W.Layout(align_items="center"))
        self.detail = W.VBox(layout=W.Layout(margin="0 0 4px 72px"))  # indented under the thumbnail
        self.detail.add_class("mochi-history-detail")
        super().__init__([self.line, self.detail], layout=W.Layout(border_bottom=f"1px solid {BORDER}"))
        self.add_class("mochi-history-row")

    def _delete(self, delete: Callable[["Job"], None]) -> None:
        # Deleting removes the MP4 too: the first click only arms the button.
        if not self.armed:
            self.armed = True
            self.delete_button.description, self.delete_button.button_style = "Confirm", "danger"
            return
        delete(self.job)


class History(StaticStandIn, HasCardStack, W.VBox):
    """Newest first, `limit` rows a page. Filters re-list at once; Play and Re-run open under their row.

    `stack` owns and polls the re-run cards (it is not shown itself: each card is shown under its row).
    """

    def __init__(self, cluster: "MochiCluster", *, status: str | None = None, text: str = "",
                 experiment: str = "", limit: int = 20, download_dir: str | Path | None = None,
                 interval: float = DEFAULT_INTERVAL_S):
        self.cluster = cluster
        self.limit = limit
        self.offset = 0
        self.download_dir = Path(download_dir) if download_dir else default_download_dir()
        self.listed_at: float | None = None  # when the rows on screen were read
        self._snapshots: list[Any] = []  # display handles of the static stand-ins
        self._thumbs: dict[str, bytes] = {}  # job id -> PNG bytes, so paging does not re-read files
        self.status = W.Dropdown(options=[(ALL, ALL)] + [(s, s) for s in STATUSES], value=status or ALL,
                                 description="status", layout=W.Layout(width="180px"),
                                 style={"description_width": "45px"})
        self.text = W.Text(value=text, placeholder="prompt contains…", continuous_update=False,
                           layout=W.Layout(width="220px"))
        self.experiment = W.Combobox(value=experiment, placeholder="experiment", continuous_update=False,
                                     ensure_option=False, layout=W.Layout(width="160px"))
        self.refresh_button = _button("Refresh", "refresh")
        self.prev_button = W.Button(description="◀", layout=W.Layout(width="40px"))
        self.next_button = W.Button(description="▶", layout=W.Layout(width="40px"))
        self.page = W.Label()
        self.error = W.HTML()
        self.table = W.VBox()
        self.player: W.VBox | None = None  # caption, Close and the video, under the row it plays
        self.player_close: W.Button | None = None
        self.playing: str | None = None  # id of the job in the player
        self.stack = CardStack(download_dir=Path(download_dir) if download_dir else None, interval=interval,
                               on_finish=lambda _: self.refresh())
        self.rerun_cards: dict[str, list] = {}  # source job id -> its re-runs' cards, newest first
        self.others = W.VBox()  # re-run cards whose row is not on this page
        self.stack.on_change = self._attach  # a card cleared from the stack leaves its row too
        for w in (self.status, self.text, self.experiment):
            w.observe(lambda _: self._first_page(), "value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.prev_button.on_click(lambda _: self._turn(-1))
        self.next_button.on_click(lambda _: self._turn(+1))
        bar = W.HBox([self.status, self.text, self.experiment, self.refresh_button, self.prev_button, self.page,
                      self.next_button])
        super().__init__([bar, self.error, self.table, self.others])
        self.add_class("mochi-history")
        self.refresh()

    @property
    def rows(self) -> list[HistoryRow]:
        return list(self.table.children)

    def refresh(self) -> None:
        """List the current page under the current filters (one store query plus new thumbnails)."""
        status = None if self.status.value in (None, ALL) else self.status.value
        try:
            jobs = self.cluster.jobs(status=status, experiment=self.experiment.value or None,
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
        self._attach()
        self.page.value = f"{self.offset + 1}–{self.offset + len(jobs)}" if jobs else "0"
        self.prev_button.disabled = self.offset == 0
        self.next_button.disabled = not more
        self.listed_at = time.time()
        self._snapshot_changed()

    def play(self, job: "Job") -> None:
        """Open the player under the job's row (one player at a time: it moves from row to row)."""
        r = job.record
        try:
            video = job.video  # raises unless done
        except Exception as exc:  # deleted meanwhile, or not done
            self.error.value = error_html(f"cannot play {r.id}: {type(exc).__name__}: {exc}")
            return
        self.error.value = ""
        try:  # a copy beside the notebook, so the saved listing links the video
            self.download_dir.mkdir(parents=True, exist_ok=True)
            job.save(self.download_dir)
        except Exception:  # the player works without it; the listing then shows no link
            pass
        self._close_player_widgets()
        close = W.Button(description="Close", icon="times", tooltip="close the player",
                         layout=W.Layout(width="auto", min_width="72px"))
        close.on_click(lambda _: self.close_player())
        self.player = W.VBox([W.HBox([W.HTML(render("history.html", "caption", r=job_view(r))), close],
                                     layout=W.Layout(align_items="center")), video])
        self.player.add_class("mochi-history-player")
        self.player_close = close
        self.playing = r.id
        self._attach()
        self._snapshot_changed()

    def close_player(self) -> None:
        self._close_player_widgets()
        self._attach()

    def _close_player_widgets(self) -> None:
        if self.player is not None:
            for w in (*self.player.children[0].children, *self.player.children, self.player):
                w.close()  # the video's bytes leave the front end too
        self.player, self.player_close, self.playing = None, None, None

    def rerun(self, job: "Job") -> "Job | None":
        """Queue the same params again, seed included (bypassing the result cache): the same video again.

        Its card opens under the row it came from."""
        try:
            new = job.reproduce()
        except Exception as exc:
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
            return None
        card = self.stack.add(new)
        self.rerun_cards.setdefault(job.id, []).insert(0, card)
        self.refresh()
        return new

    def delete(self, job: "Job") -> None:
        try:
            self.cluster.delete(job.id)
        except Exception as exc:
            self.error.value = error_html(f"{type(exc).__name__}: {exc}")
        self._thumbs.pop(job.id, None)
        if self.playing == job.id:
            self._close_player_widgets()
        self.refresh()

    def _attach(self) -> None:
        """Put the player and the re-run cards under their rows; cards of rows not shown go below the table."""
        kept = {id(card) for card in self.stack.cards}  # a cleared card is closed: never show it again
        self.rerun_cards = {job_id: live for job_id, cards in self.rerun_cards.items()
                            if (live := [card for card in cards if id(card) in kept])}
        shown = {row.job.id: row for row in self.rows if isinstance(row, HistoryRow)}
        for job_id, row in shown.items():
            player = [self.player] if self.player is not None and self.playing == job_id else []
            row.detail.children = [*player, *self.rerun_cards.get(job_id, [])]
        if self.playing is not None and self.playing not in shown:  # filtered or paged away
            self._close_player_widgets()
        self.others.children = [card for job_id, cards in self.rerun_cards.items() if job_id not in shown
                                for card in cards]

    # -- the notebook file -----------------------------------------------------------
    _live_text = "History (live: needs its kernel)"

    def static_html(self) -> str:
        """The listing on screen as static HTML, as of when it was read: each row's thumbnail, facts and,
        where a copy of its video is beside the notebook, a link to it (what a notebook saved with the
        save hook shows when it is opened without its kernel)."""
        rows = [self._static_row(row.job) for row in self.rows if isinstance(row, HistoryRow)]
        chosen = (("status", self.status.value), ("prompt contains", self.text.value),
                  ("experiment", self.experiment.value))
        filters = [(name, value) for name, value in chosen if value and value != ALL]
        return render("history.html", "snapshot", rows=rows, filters=filters, listed_at=self.listed_at,
                      page=self.page.value)

    def _static_row(self, job: "Job") -> dict[str, Any]:
        r = job.record
        copy = self.download_dir / f"{job.id}.mp4"
        linked = r.status == DONE and copy.is_file()
        media = {"thumbnail": thumbnail_uri(self._thumbs.get(job.id)), "video": False,
                 "href": relative_href(copy) if linked else None, "name": copy.name if linked else None,
                 "note": None if linked or r.status != DONE
                 else "video not copied beside the notebook (Play copies it)"}
        return job_view(r, media=media)

    def dataframe(self) -> "pd.DataFrame":
        """The rows on this page as a DataFrame (see `jobs_frame`)."""
        return jobs_frame(row.job for row in self.rows if isinstance(row, HistoryRow))

    def _first_page(self) -> None:
        if self.status.value is None:  # "no selection" would leave the dropdown blank: it means all
            self.status.value = ALL  # observed: lists the first page again
            return
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

    def _thumbnail(self, job: "Job") -> tuple[bytes, str] | None:
        if job.record.status != DONE:  # not cached: it changes while the job runs
            try:
                preview = job.preview
            except Exception:
                return None
            return (preview, "webp") if preview else None
        if job.id not in self._thumbs:
            try:
                thumb = job.thumbnail  # PNG bytes from the backend, or None
            except Exception:  # deleted meanwhile, or unreachable: the row shows a placeholder
                return None
            if not thumb:
                return None
            self._thumbs[job.id] = bytes(thumb)
        return self._thumbs[job.id], "png"


def jobs_frame(jobs: Iterable["Job"]) -> "pd.DataFrame":
    """Jobs as a DataFrame, one row each, from the records already read (no store I/O)."""
    import pandas as pd

    columns = ["id", "created", "status", "prompt", "num_frames", "height", "width", "num_inference_steps",
               "guidance_scale", "seed", "fps", "model", "lora", "lora_scale", "experiment", "tags", "run_s", "video",
               "error"]
    rows = []
    for j in jobs:
        row = job_row(j.record)
        row["lora"], row["lora_scale"] = lora_columns(row["lora"])  # by adapter and scale, as an experiment's
        created = to_float(row["created_at"])
        row["created"] = pd.Timestamp(created, unit="s") if created is not None else pd.NaT
        rows.append({c: row[c] for c in columns})
    return pd.DataFrame(rows, columns=columns)
