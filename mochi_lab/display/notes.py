"""The lines about a job's life that a view shows beside its bar, and that a record alone does not say plainly:
its place in the queue (`queue_note`), a lost worker and the retry (`RetryTracker`, which follows one job's
successive records), where a cancelled job stopped (`stopped_note`).

Pure: records in, lines of text out, no I/O and no Jinja2: a job's follower (`client.follow`) and the text bar
use them in scripts that never display anything; the HTML views show them as notes.
"""

from __future__ import annotations

import time
from typing import Any

from mochi_lab.display.values import field, mapping, seconds, text, to_float, to_int

LEASE_GRACE_S = 2.0  # a lease this far past its deadline means its worker stopped heartbeating


def ordinal(n: Any) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 22nd (anything that is not a whole number is shown as text)."""
    k = to_int(n)
    if k is None:
        return text(n)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def queue_note(position: Any) -> str | None:
    """A queued job's place, as `Job.queue_position()` reports it: "3rd of 5 in the queue · ~2 min"."""
    p = mapping(position)
    pos, of = to_int(p.get("position")), to_int(p.get("queued"))
    if pos is None:
        return None
    line = f"{ordinal(pos)} of {of} in the queue" if of and of > 1 else "next in the queue"
    eta = to_float(p.get("eta_s"))
    if eta is not None:
        line += f" · ~{_eta_words(eta)}"
    if to_int(p.get("workers")) == 0:
        line += " · no worker serves this model yet"
    return line


def _eta_words(s: float) -> str:
    if s < 60:
        return f"{max(5, int(round(s / 5.0)) * 5)} s"
    return f"{int(round(s / 60.0))} min"


class RetryTracker:
    """Follows one job's successive records and says what a snapshot cannot: that a worker was lost.

    A record holds only the attempt count; the stage where a lost attempt stopped is the last one this
    tracker saw before the job went back to the queue (or came back with a higher attempt). Pure:
    records in, lines out, no I/O. `observe` returns new events (for a text progress bar), `notes`
    the lines a view shows now.
    """

    def __init__(self) -> None:
        self.attempt: int | None = None  # the attempt count of the last record seen
        self.status: Any = None
        self.stage: str | None = None  # the last stage seen while the current attempt ran
        self.lost = False  # a worker of this job was lost (seen, or implied by the attempt count)
        self.lost_stage: str | None = None  # where, when seen
        self.lease_expired_for: float | None = None

    def observe(self, r: Any, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        status, stage = field(r, "status"), field(r, "stage")
        attempt = to_int(field(r, "attempts"), 0) or 0
        events: list[str] = []
        if self.attempt is None:  # the first record: a retry already under way shows in its count
            self.lost = status == "running" and attempt > 1 or status == "queued" and attempt >= 1
        else:
            was_running = self.status == "running"
            if was_running and (attempt > self.attempt or status == "queued"):
                self.lost, self.lost_stage, self.stage = True, self.stage, None
                events.append(self.line(status, attempt))
            elif attempt > self.attempt and self.lost and self.status == "queued":
                events.append(self.line(status, attempt))  # the requeued job was claimed again
        if status == "running" and isinstance(stage, str) and stage != "claimed":
            self.stage = stage
        self.attempt, self.status = attempt, status
        expires = to_float(field(r, "lease_expires_at"))
        self.lease_expired_for = (now - expires if status == "running" and expires is not None
                                  and now - expires > LEASE_GRACE_S else None)
        return events

    def line(self, status: Any, attempt: int) -> str:
        where = f"worker lost at {self.lost_stage}" if self.lost_stage else "worker lost"
        if status == "queued":
            return f"{where}; queued again for attempt {attempt + 1}"
        return f"{where}; retrying, attempt {attempt}"

    def notes(self, r: Any) -> list[str]:
        """The lines a view shows for the record last observed (none once the job has ended)."""
        status = field(r, "status")
        out: list[str] = []
        if self.lost and status in ("running", "queued"):
            out.append(self.line(status, to_int(field(r, "attempts"), 0) or 0))
        if self.lease_expired_for is not None and status == "running":
            out.append(f"no heartbeat from its worker for {seconds(self.lease_expired_for)}: the job goes back "
                       "to the queue when its lease is taken back")
        return out


def stopped_note(r: Any) -> str | None:
    """Where a cancelled job stopped: "stopped at denoising step 57/200", after its last step (while its
    worker decoded or encoded: the stage a cancelled record keeps is "cancelled"), or that it never started."""
    if field(r, "status") != "cancelled":
        return None
    step, total = to_int(field(r, "step")), to_int(field(r, "total_steps"))
    if not field(r, "started_at") and not step:
        return "cancelled before it started"
    if step and total and step >= total:
        return f"stopped after denoising ({step}/{total} steps), before its video was written"
    if step and total:
        return f"stopped at denoising step {step}/{total}"
    return "stopped before denoising"


__all__ = ["LEASE_GRACE_S", "RetryTracker", "ordinal", "queue_note", "stopped_note"]
