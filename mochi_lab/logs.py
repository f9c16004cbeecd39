"""Bounded logs for processes that run for days: a loop's repeated error is written once a minute with a
count of the rest (`log_repeating`), and the local runtime's log file rotates at a size cap (`RotatingLog`).
A worker's lines are JSON objects carrying the job's id (`JsonFormatter`).

A store outage makes every loop fail each tick, and each failure used to be a line (or a traceback): one
runtime wrote 22 MB in two hours. Here the first line of a run is written at once, the repeats are
counted, and the next one written after `WINDOW_S` says how many were held back.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WINDOW_S = 60.0
LOG_MAX_BYTES = 1 << 20  # a rotated log file's size cap
LOG_BACKUPS = 3  # runtime.log.1 .. .3 kept: 4 MiB at most


class RepeatLimiter:
    """Lets the first of a run of like log lines through, then at most one per `window_s`, which ends in
    "(... N more in the last 60 s)". Lines are alike when one logger writes them with one format string,
    whatever their arguments (job ids, counts, the error's text): the call site, in effect."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._runs: dict[tuple[str, str], tuple[float, int]] = {}  # key -> (when last written, lines held since)
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """`logger.log(level, msg, *args, **kwargs)`, unless a like line was written under `window_s`
        ago (then it is only counted). True when written."""
        key, now = (logger.name, msg), self.clock()
        with self._lock:
            written, held = self._runs.get(key, (None, 0))
            if written is not None and now - written < self.window_s:
                self._runs[key] = (written, held + 1)
                return False
            self._runs[key] = (now, 0)
        if held:
            msg = f"{msg} (... {held} more in the last {now - written:.0f} s)"
        kwargs.setdefault("stacklevel", 2)  # the record names the caller's line, not this one
        logger.log(level, msg, *args, **kwargs)
        return True


_shared = RepeatLimiter()


def log_repeating(logger: logging.Logger, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
    """Log a line that a loop may repeat every tick (a store outage, a failing poll): through this
    process's one `RepeatLimiter`, so each call site writes at most one line a minute."""
    return _shared.log(logger, level, msg, *args, **{"stacklevel": 3, **kwargs})


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A log file rotated at `max_bytes`, keeping `backups` older ones (`path.1` the newest). With
    `capture_std`, the process's stdout and stderr (fds 1 and 2: Ray's own messages, a crash's
    traceback) follow the current file, so nothing keeps writing into a rotated-away one; what they
    write counts toward the cap at the next logged line."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
                 capture_std: bool = False) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.capture_std = capture_std
        self._capture()

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        self._capture()

    def _capture(self) -> None:
        if self.capture_std and self.stream is not None:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


__all__ = ["LOG_BACKUPS", "LOG_MAX_BYTES", "WINDOW_S", "RepeatLimiter", "RotatingLog", "log_repeating"]


class JsonFormatter(logging.Formatter):
    """One JSON object a line; `extra={"job_id": ...}` lands as a field."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        for key in ("job_id", "worker_id", "attempt"):
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)
