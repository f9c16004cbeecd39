"""Smoke run of benchmarks/gpu_mochi.py: the tiny CPU config goes through MochiRunner with every option,
CFG-parallel on two gloo processes included, and writes the full JSON and table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_mochi.py"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_mochi")
    results = tmp_path_factory.mktemp("results")
    # --smoke forces CPU even where CUDA exists; a smoke run never writes under results/
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke", "--results-dir", str(results)],
                          capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(results.iterdir())
    return json.loads((out / "gpu_mochi.json").read_text()), proc.stdout


def test_every_option_ran_through_the_runner(smoke_run: tuple[dict, str]) -> None:
    res, _ = smoke_run
    assert "errors" not in res, res.get("errors")
    assert res["meta"]["mode"] == "smoke" and res["gpu_name"] is None
    rows = {(r["option"], r["frames"]): r for r in res["runs"]}
    assert {("baseline", 7), ("vae_untiled", 7), ("first_block_cache", 7), ("first_block_cache_all_hits", 7),
            ("cfg_parallel", 7), ("compile", 7)} <= set(rows)
    for r in rows.values():
        for key in ("step_s", "step_tflop", "mfu", "text_s", "wall_s"):
            assert r[key] > 0, (key, r)
        assert r["tokens"] == r["visual_tokens"] + res["meta"]["text_tokens"]
    for option in ("baseline", "vae_untiled", "cfg_parallel"):  # rank 0 decodes in CFG-parallel too
        assert rows[(option, 7)]["decode_s"] > 0
    # the cache hooks ran and were counted; a huge threshold skips every call after the first
    hits = rows[("first_block_cache_all_hits", 7)]
    assert hits["step_cache_skips"] == hits["step_cache_calls"] - 1 > 0
    cfg = rows[("cfg_parallel", 7)]
    assert cfg["gpus"] == 2 and cfg["gather_s_per_step"] > 0 and cfg["sync_s_per_step"] > 0
    assert res["cfg_parallel_text"]["broadcast_s"] > 0 and res["cfg_parallel_text"]["encode_s"] > 0


def test_projection_goals_and_table(smoke_run: tuple[dict, str]) -> None:
    res, stdout = smoke_run
    proj = res["projection"]
    assert {"baseline@7f", "baseline@13f", "cfg_parallel@7f"} <= set(proj)
    assert all(p["total_s"] > p["denoise_64_s"] > 0 for p in proj.values())
    assert res["goals"]["denoise_mfu_ok"] is None  # no verdict from a CPU
    assert "MFU" in stdout and "SMOKE" in stdout and "CFG-parallel step / baseline step" in stdout
    assert "FLOP/pass = 2*L*(4d^2+3df)*V + 4*N^2*d*L" in stdout
