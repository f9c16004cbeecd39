"""`mochi-lab`, the console script README's first command runs: a video, clear failures, exit codes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mochi_lab.cli import EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, main
from mochi_lab.video import probe
from tests.support.jobkit import SECONDS


@pytest.fixture
def session_pool(mochi, test_settings, monkeypatch):
    """The CLI joins the session's Ray and re-attaches to its pool (same namespace), as on a real cluster."""
    monkeypatch.setenv("MOCHI_LAB_NAMESPACE", test_settings.namespace)
    monkeypatch.setenv("RAY_ADDRESS", test_settings.ray_address)
    return mochi


def test_the_console_script_makes_a_video(session_pool, tmp_path):
    exe = shutil.which("mochi-lab") or pytest.fail("the mochi-lab console script is not installed")
    out = tmp_path / "cat.mp4"
    proc = subprocess.run(
        [exe, "generate", "a cat surfing a wave", "-o", str(out), "--height", "32", "--width", "48",
         "--frames", "7", "--steps", "2", "--seed", "42", "--fps", "8", "--timeout", "300"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    info = probe(out)
    assert (info.frames, info.height, info.width, info.codec) == (7, 32, 48, "h264")
    lines = proc.stdout.splitlines()
    assert lines[0] == str(out)
    summary = json.loads(lines[1])
    assert summary["seed"] == 42 and summary["job"] and summary["denoise_s"] > 0
    assert "Traceback" not in proc.stderr


def test_output_into_a_missing_folder_fails_before_anything_is_queued(session_pool, capsys):
    before = session_pool.counts()
    code = main(["generate", "a cat", "-o", "/nonexistent/folder/cat.mp4", "--steps", "2"])
    assert code == EXIT_USAGE
    assert "folder /nonexistent/folder does not exist" in capsys.readouterr().err
    assert session_pool.counts() == before


def test_bad_params_name_the_field_and_exit_2(capsys):
    assert main(["generate", "a cat", "--frames", "84"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "num_frames:" in err and "79 or 85" in err and "Traceback" not in err


def test_a_timeout_is_one_line_and_exit_124(session_pool, tiny, capsys):
    s = SECONDS  # a job of seconds: it is still running at the timeout
    code = main(["generate", "a slow tide", "--frames", str(s["num_frames"]), "--height", str(s["height"]),
                 "--width", str(s["width"]), "--steps", str(s["num_inference_steps"]), "--timeout", "0.5", "--force"])
    err = capsys.readouterr().err
    assert code == EXIT_TIMEOUT
    last = err.strip().splitlines()[-1]
    assert last.startswith("mochi-lab: job ") and "after 0.5 s" in last and "Traceback" not in err
    job_id = last.split()[2].rstrip(":")
    session_pool.job(job_id).cancel()  # leave the pool free for the next test


def test_a_failed_job_is_one_line_and_exit_1(session_pool, broken_checkpoint, capsys):
    code = main(["generate", "nan weights", "--model", "tiny-broken", "--frames", "7", "--height", "32",
                 "--width", "32", "--steps", "2", "--timeout", "300", "--force"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    last = err.strip().splitlines()[-1]
    assert "failed: FloatingPointError: non-finite latents" in last and "Traceback" not in err


def test_debug_shows_the_traceback_of_an_unexpected_error(monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")  # nothing listens on port 1
    assert main(["generate", "a cat", "--steps", "2"]) == EXIT_FAILED
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("mochi-lab:")]  # not Ray's forwarded logs
    assert len(ours) == 1 and "StoreUnavailable" in ours[0] and "Traceback" not in err and "hunter2" not in err
    with pytest.raises(Exception, match="127.0.0.1:1"):
        main(["generate", "a cat", "--steps", "2", "--debug"])


def test_python_m_mochi_lab_cli_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "mochi_lab.cli", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "generate" in proc.stdout and "experiment" in proc.stdout
