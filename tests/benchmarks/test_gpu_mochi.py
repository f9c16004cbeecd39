"""Smoke test of benchmarks/gpu_mochi.py: the tiny CPU config runs end to end and writes the full JSON structure."""
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
    # One timed step per config keeps this to ~15 s on 2 cores; --smoke forces CPU even where CUDA exists.
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke", "--iters", "1"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_mochi.json").read_text()), proc.stdout


def test_json_structure(smoke_run: tuple[dict, str]) -> None:
    res, _ = smoke_run
    assert set(res) >= {"meta", "denoise", "step_cache", "offload", "vae", "projection", "memory_checks", "memory_ok"}
    assert "errors" not in res, res.get("errors")
    assert res["meta"]["mode"] == "smoke"
    assert "4*N^2*3072*48" in res["meta"]["flop_formula"]


def test_denoise_numbers_positive(smoke_run: tuple[dict, str]) -> None:
    res, _ = smoke_run
    rows = {(r["option"], r["frames"]): r for r in res["denoise"]}
    # Both lengths for the baseline and for the compiled (eager backend in smoke) transformer.
    assert {("baseline_sdpa", 7), ("baseline_sdpa", 13), ("compile_eager", 7), ("compile_eager", 13)} <= set(rows)
    for r in rows.values():
        for key in ("step_s", "step_tflop", "achieved_tflops", "mfu", "denoise_64_s", "visual_tokens"):
            assert r[key] > 0, (key, r)
        assert r["tokens"] == r["visual_tokens"] + res["meta"]["text_tokens"]
        assert "memory" in r


def test_cache_vae_projection(smoke_run: tuple[dict, str]) -> None:
    res, _ = smoke_run
    cache = res["step_cache"]
    assert cache["miss_step_s"] > 0 and cache["hit_step_s"] > 0
    assert 0.0 <= cache["observed_skip_ratio"] <= 1.0
    # threshold -1 never skips; threshold inf skips every call after the first.
    assert cache["miss_skips"] == "0/2" and cache["hit_skips"] == "1/2"
    assert [r["tiled"] for r in res["vae"]] == [True, False]
    assert all(r["decode_s"] > 0 and r["output_shape"][2] == 7 for r in res["vae"])
    assert all(p["total_s"] > 0 for p in res["projection"].values())
    assert res["offload"]["transformer_bytes"] > 0


def test_table_mentions_mfu_and_formula(smoke_run: tuple[dict, str]) -> None:
    _, stdout = smoke_run
    assert "MFU" in stdout
    assert "FLOP/pass = 2*L*(4d^2+3df)*V + 4*N^2*d*L" in stdout
    assert "10.87 GFLOP" in stdout
    assert "SMOKE" in stdout
