"""Bounded logs: a repeated line is written once, then once a window with a count of the rest (a clock of the
test's own, no sleeps); a log file rotates at its cap and keeps a fixed number of old files, and the stdout
and stderr it captures follow it across rotations."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from mochi_lab.logs import RepeatLimiter, RotatingLog


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logger(name: str) -> tuple[logging.Logger, list[str]]:
    logger = logging.getLogger(f"test_logs.{name}")
    logger.handlers[:] = [handler := _Lines()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler.lines


def test_a_repeated_line_is_written_once_then_once_a_window_with_the_count_of_the_rest():
    clock = _Clock()
    limiter = RepeatLimiter(window_s=60, clock=clock)
    logger, lines = _logger("repeat")
    written = []
    for i in range(59):  # a failing loop: one error a second, the job id and the count changing
        written.append(limiter.log(logger, logging.WARNING, "poll of %s failed (%d)", f"job-{i}", i))
        clock.now += 1
    assert written == [True] + [False] * 58
    assert lines == ["poll of job-0 failed (0)"]
    clock.now = 1000.0 + 60  # a window after the written line
    assert limiter.log(logger, logging.WARNING, "poll of %s failed (%d)", "job-59", 59)
    assert lines[-1] == "poll of job-59 failed (59) (... 58 more in the last 60 s)"
    clock.now += 30  # a new window started with that line
    assert not limiter.log(logger, logging.WARNING, "poll of %s failed (%d)", "job-60", 60)
    clock.now += 3600  # quiet for an hour, then the held one is counted over the whole span
    assert limiter.log(logger, logging.WARNING, "poll of %s failed (%d)", "job-61", 61)
    assert lines[-1] == "poll of job-61 failed (61) (... 1 more in the last 3630 s)"
    clock.now += 120  # nothing held since: a plain line
    assert limiter.log(logger, logging.WARNING, "poll of %s failed (%d)", "job-62", 62)
    assert lines[-1] == "poll of job-62 failed (62)"
    assert len(lines) == 4


def test_a_written_line_names_its_callers_line():
    from mochi_lab.logs import log_repeating

    logger = logging.getLogger("test_logs.caller")
    logger.propagate = False
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.handlers[:] = [handler]
    log_repeating(logger, logging.WARNING, "a line of this test's own: %s", "x")
    RepeatLimiter().log(logger, logging.WARNING, "another line of this test's own")
    assert [(r.filename, r.funcName) for r in records] == [("test_logs.py", "test_a_written_line_names_its_callers_line")] * 2


def test_call_sites_and_loggers_are_limited_apart():
    clock = _Clock()
    limiter = RepeatLimiter(window_s=60, clock=clock)
    first, first_lines = _logger("first")
    second, second_lines = _logger("second")
    for _ in range(5):
        limiter.log(first, logging.WARNING, "store unavailable: %s", "refused")
        limiter.log(first, logging.WARNING, "heartbeat failed: %s", "refused")
        limiter.log(second, logging.WARNING, "store unavailable: %s", "refused")
        clock.now += 1
    assert first_lines == ["store unavailable: refused", "heartbeat failed: refused"]
    assert second_lines == ["store unavailable: refused"]


def test_the_traceback_of_a_written_line_is_kept_and_held_ones_write_nothing(tmp_path):
    clock = _Clock()
    limiter = RepeatLimiter(window_s=60, clock=clock)
    logger = logging.getLogger("test_logs.tb")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "tb.log")
    logger.handlers[:] = [handler]
    for _ in range(100):
        try:
            raise ConnectionError("refused")
        except ConnectionError:
            limiter.log(logger, logging.ERROR, "could not read the runtime's activity", exc_info=True)
        clock.now += 0.5
    handler.close()
    text = (tmp_path / "tb.log").read_text()
    assert text.count("Traceback (most recent call last)") == 1 and "ConnectionError: refused" in text


def test_a_log_file_rotates_at_its_cap_and_keeps_its_backups_only(tmp_path):
    path = tmp_path / "runtime.log"
    handler = RotatingLog(path, max_bytes=1000, backups=2)
    logger = logging.getLogger("test_logs.rotate")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    for i in range(200):  # 200 lines of 50 bytes: 10 kB through a 1 kB cap
        logger.info("line %03d %s", i, "x" * 40)
    handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["runtime.log", "runtime.log.1", "runtime.log.2"]
    assert all((tmp_path / name).stat().st_size <= 1000 for name in files)
    assert path.read_text().splitlines()[-1].startswith("line 199")  # the newest in the current file
    assert (tmp_path / "runtime.log.2").read_text() < (tmp_path / "runtime.log.1").read_text()  # older first
    assert "line 000" not in "".join((tmp_path / name).read_text() for name in files)  # the oldest are gone


CAPTURE = """
import logging, os, sys
from pathlib import Path
from mochi_lab.logs import RotatingLog
logging.basicConfig(level=logging.INFO, handlers=[RotatingLog(Path(sys.argv[1]), max_bytes=300, backups=1,
                                                              capture_std=True)])
print("stdout before", flush=True)
os.write(2, b"stderr before\\n")
for i in range(10):
    logging.info("line %d %s", i, "x" * 40)
print("stdout after", flush=True)
os.write(2, b"stderr after\\n")
"""


def test_captured_stdout_and_stderr_follow_the_current_file_across_rotations(tmp_path):
    path = tmp_path / "runtime.log"
    subprocess.run([sys.executable, "-c", CAPTURE, str(path)], check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    current = path.read_text()
    assert "stdout after" in current and "stderr after" in current, current
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["runtime.log", "runtime.log.1"]
