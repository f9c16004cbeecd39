#!/usr/bin/env bash
# Issue 27's standing order, in one run: benchmarks/gpu_mochi.py in full (each section as the budget allows),
# the 2-GPU CFG gang when the machine has 2 GPUs (a "1 GPU" record and a modelled projection otherwise),
# and the product path (a saved full-size random checkpoint, one job through mochi_lab's worker loop, its
# MP4 decoded, job.timings and the worker row's NVML figures).
#
#   bash benchmarks/gpu_standing_order.sh [OUT_DIR] [extra gpu_mochi.py options, e.g. --smoke]
#
# OUT_DIR defaults to $OUT (the device machine's folder that comes back), else out/standing_order. Wheels in
# .whl/ (see benchmarks/README.md) are installed first, into /tmp/site. BUDGET_S (default 330) bounds the
# Python run: sections that would overrun are skipped and recorded; a hard stop 45 s later keeps whatever
# JSON was written. The results land in OUT_DIR: gpu_mochi.json, <date>-<gpu>.json (commit it under
# benchmarks/results/), log.txt and gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/standing_order}}"
shift $(( $# > 0 ? 1 : 0 ))
budget="${BUDGET_S:-330}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$out/log.txt"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"; } > "$out/gpu.txt"
PYTHONUNBUFFERED=1 timeout -k 10 $(( ${budget%.*} + 45 )) "$python" benchmarks/gpu_mochi.py "$out" --all \
  --budget-s "$budget" --results-dir "$out" "$@" 2>&1 | tee "$out/log.txt"
