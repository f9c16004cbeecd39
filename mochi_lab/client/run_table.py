"""A table of runs in a notebook: `RunJobs`, the list of jobs a sweep returns, and `LiveTable`, which keeps
a run table live until its runs end (one listing per tick, from one `GroupFollower`), then leaves it as
static HTML. `Experiment` (client/experiment.py) shows itself through them too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mochi_lab.client.follow import GroupFollower
from mochi_lab.client.job import Job
from mochi_lab.model import JobNotFound, JobRecord

if TYPE_CHECKING:
    from mochi_lab.client.experiment import Experiment

MISSING = "missing"  # a planned run with no job (its client died before queueing it)
LIST_LIMIT = 100_000  # one experiment's jobs, attempts included


class RunJobs(list):
    """The jobs `Experiment.sweep()` and `resume()` return: a plain list of `Job`, which a notebook
    shows as a table with each job's status and the overall progress, kept live until they end (`live()`)."""

    def __init__(self, jobs: Iterable[Job] = (), *, experiment: "Experiment | None" = None):
        super().__init__(jobs)
        self.experiment = experiment

    def _records(self) -> list[JobRecord | None]:
        """Each job's current record (None: deleted), in one listing of the experiment's jobs."""
        listed = {}
        if self.experiment is not None:
            listed = {r.id: r for r in self.experiment._backend.list(experiment=self.experiment.name,
                                                                      limit=LIST_LIMIT)}
        return [listed.get(job.id) or current_record(job) for job in self]

    def _items(self, records: Mapping[str, JobRecord | None]) -> list[tuple[dict[str, Any], JobRecord | None]]:
        return [(dict(job.record.params), records.get(job.id)) for job in self]

    def _html(self, records: Mapping[str, JobRecord | None]) -> str:
        from mochi_lab.display.experiment import jobs_html

        return jobs_html(self.experiment.name if self.experiment is not None else "-", self._items(records))

    def _repr_html_(self) -> str:
        from mochi_lab.display.reprs import error_html

        try:
            records = self._records()
        except Exception as exc:  # the store is down: say so where the table would be
            return error_html(f"cannot read the jobs: {type(exc).__name__}: {exc}")
        return self._html({job.id: rec for job, rec in zip(self, records, strict=True)})

    def live(self, *, publish: Callable[[dict[str, Any], bool], None] | None = None) -> "LiveTable":
        """The table, kept live until these jobs end (what displaying the list does): one listing of the
        experiment's jobs per tick."""
        records = {job.id: rec for job, rec in zip(self, self._records(), strict=True)}
        if self.experiment is not None:
            group = self.experiment.follower(records)
        else:  # a list of jobs of no experiment: no listing holds them all
            group = GroupFollower(lambda: [r for r in map(current_record, self) if r is not None], records)
        return LiveTable(group, self._html, publish=publish)

    def _ipython_display_(self) -> None:
        display_live(self.live, self._repr_html_)


class LiveTable:
    """A run table in a notebook, kept live until its runs end, then left as static HTML: redrawn in place
    (an `Output`) from one `GroupFollower` on the kernel's event loop (one listing per tick, never a read per
    job): runs finished out of total, an ETA, and failures called out. `step()` is one listing."""

    def __init__(self, group: GroupFollower, draw: Callable[[Mapping[str, JobRecord | None]], str], *,
                 publish: Callable[[dict[str, Any], bool], None] | None = None):
        from mochi_lab.display.live import Output  # the display, loaded once a table is shown live

        self.group = group
        self._draw = draw
        self.output = Output(publish)
        group.listen(lambda _: self.send())

    @property
    def html(self) -> str | None:
        return self.output.html

    @property
    def finished(self) -> bool:
        return not self.group.pending

    def send(self) -> None:
        html = self._draw(self.group.records)
        self.output.send({"text/plain": f"<runs: {summary(self.group.records)}>", "text/html": html})

    def start(self) -> "LiveTable":
        """Show the table now, and keep it live while runs are pending (and a loop runs: else a snapshot)."""
        self.send()
        self.group.start()
        return self

    def step(self) -> bool:
        """One listing (the table redrawn if it changed); returns whether any run is still pending."""
        return self.group.step()

    async def wait(self, timeout: float | None = None) -> None:
        """Await the end of the runs without blocking the loop (top-level `await` in a cell)."""
        if self.group.start() and self.group._task is not None:
            await asyncio.wait_for(asyncio.shield(self.group._task), timeout)

    def close(self) -> None:
        self.group.stop()


def display_live(live: Callable[[], LiveTable], static: Callable[[], str]) -> None:
    """Display a live table, or (the store is down) the static HTML that says so."""
    try:
        table = live()
    except Exception:
        from IPython.display import display

        display({"text/plain": "<runs>", "text/html": static()}, raw=True)
        return
    table.start()


def current_record(job: Job) -> JobRecord | None:
    """The job read now; None if it was deleted."""
    try:
        return job.refresh()
    except JobNotFound:
        return None


def summary(jobs: Mapping[str, JobRecord | None]) -> str:
    """"done=3 running=1": how many runs have each status."""
    counts: dict[str, int] = {}
    for job in jobs.values():
        status = job.status if job is not None else MISSING
        counts[status] = counts.get(status, 0) + 1
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


__all__ = ["LIST_LIMIT", "MISSING", "LiveTable", "RunJobs", "current_record", "display_live", "summary"]
