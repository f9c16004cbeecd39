"""The pool controller on Ray's real autoscaler (fake multi-node provider): up from the queue, down to zero
nodes when idle, and back from zero. The scenario runs in its own process (tests/support/autoscale_scenario.py)
because this one is joined to the session's Ray; it writes artifacts/autoscaling_timeline.png and .json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


@pytest.mark.usefixtures("autoscaler")
def test_queue_brings_up_three_workers_idle_removes_their_nodes_and_a_job_brings_one_back(tiny_checkpoint):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "autoscale_scenario.py"), str(ARTIFACTS)],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (ARTIFACTS / "autoscaling_timeline.json").write_text(json.dumps(result, indent=1))
    f = result["figures"]
    print("\nautoscaling figures:", json.dumps(f))  # -s shows them; they are in the JSON beside the plot too
    assert f["max_gpu_nodes"] == 3 and f["max_workers_ready"] == 3  # 6 queued jobs, max_workers=3
    assert f["jobs_lost"] == 0 and f["jobs_run_twice"] == 0 and f["videos"] == 7
    assert f["from_zero_video_frames"] == 13
    assert f["stage_while_waiting"] == [f["waiting_stage_name"]] * 2
    # nothing lingers: idle workers retire after their timeout, then the autoscaler removes their nodes
    assert f["idle_timeout_s"] - 1 <= f["idle_to_workers_retired_s"] < f["idle_to_nodes_removed_s"]
    assert f["first_queued_to_first_worker_ready_s"] is not None and f["from_zero_job_to_worker_ready_s"] is not None
    rows = result["timeline"]
    assert rows[-1]["nodes"] == 1 and min(r["nodes"] for r in rows if r["t"] > f["six_jobs_done_s"]) == 0
    assert (ARTIFACTS / "autoscaling_timeline.png").stat().st_size > 10_000
