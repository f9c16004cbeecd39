"""`mochi-lab`, the console script README's first command runs: a video, clear failures, exit codes.

A `generate` that gets as far as queueing joins a Ray (the CLI has no other pool): those tests join the
session's multi-node Ray (`ray_pool`, the integration tier); the failures found before anything starts stay
in the fast tier."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mochi_lab.cli import EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, main
from mochi_lab.store import open_store
from mochi_lab.video import probe


@pytest.fixture
def ray_pool(ray_mochi, ray_settings, monkeypatch):
    """The CLI joins the session's Ray and re-attaches to its pool (same namespace and store), as on a real
    cluster."""
    monkeypatch.setenv("MOCHI_LAB_NAMESPACE", ray_settings.namespace)
    monkeypatch.setenv("RAY_ADDRESS", ray_settings.ray_address)
    monkeypatch.setenv("MOCHI_LAB_DATA_DIR", str(ray_settings.data_dir))
    return ray_mochi


def test_the_console_script_makes_a_video(ray_pool, tmp_path):
    exe = shutil.which("mochi-lab") or pytest.fail("the mochi-lab console script is not installed")
    out = tmp_path / "cat.mp4"
    proc = subprocess.run(
        [exe, "generate", "a cat surfing a wave", "-o", str(out), "--height", "32", "--width", "48",
         "--frames", "7", "--steps", "2", "--seed", "42", "--fps", "8", "--timeout", "300"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = probe(out)
    assert (info.frames, info.height, info.width, info.codec) == (7, 32, 48, "h264")
    lines = proc.stdout.splitlines()
    assert lines[0] == str(out)
    summary = json.loads(lines[1])
    assert summary["seed"] == 42 and summary["job"] and summary["denoise_s"] > 0
    assert "Traceback" not in proc.stderr


def test_output_into_a_missing_folder_fails_before_anything_is_queued(test_settings, capsys):
    """The session's store is the CLI's too (with no RAY_ADDRESS it would start a Ray had it got that far)."""
    store = open_store(test_settings.store_url)
    before = store.counts(test_settings.account)
    code = main(["generate", "a cat", "-o", "/nonexistent/folder/cat.mp4", "--steps", "2"])
    assert code == EXIT_USAGE
    assert "folder /nonexistent/folder does not exist" in capsys.readouterr().err
    assert store.counts(test_settings.account) == before
    store.close()


def test_bad_params_name_the_field_and_exit_2(capsys):
    assert main(["generate", "a cat", "--frames", "84"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "num_frames:" in err and "79 or 85" in err and "Traceback" not in err


def test_a_timeout_is_one_line_and_exit_124(ray_pool, tiny, capsys, hold):
    hold("a tide held past the timeout")  # still running at the timeout, however fast the machine
    code = main(["generate", "a tide held past the timeout", "--frames", str(tiny["num_frames"]), "--height",
                 str(tiny["height"]), "--width", str(tiny["width"]), "--steps", str(tiny["num_inference_steps"]),
                 "--timeout", "0.5", "--force"])
    err = capsys.readouterr().err
    assert code == EXIT_TIMEOUT
    last = err.strip().splitlines()[-1]
    assert last.startswith("mochi-lab: job ") and "after 0.5 s" in last and "Traceback" not in err
    job_id = last.split()[2].rstrip(":")
    ray_pool.job(job_id).cancel()  # leave the pool free for the next test


def test_a_failed_job_is_one_line_and_exit_1(ray_pool, broken_checkpoint, capsys):
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
                          timeout=60, check=False)
    assert proc.returncode == 0 and "generate" in proc.stdout and "experiment" in proc.stdout
