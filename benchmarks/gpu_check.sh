#!/usr/bin/env bash
# The GPU check: one prepared run (< 8 minutes on one GPU) of everything a GPU machine must show.
#
#   benchmarks/gpu_check.sh              # on a CUDA machine: gpu tests, TA / DO-Merging / TIES on 8b and the
#                                        # 70B slice with --device cuda, a 2-rank NCCL merge when 2 GPUs exist
#   benchmarks/gpu_check.sh --dry-run    # on CPU: the same steps on the tiny preset, a 2-rank gloo merge
#
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to ./gpu_check_out).
# PYTHON: the interpreter with streammerge's dependencies (default .venv/bin/python, else python3).
# Models and scratch output go to $STREAMMERGE_BENCH_DATA (default /tmp/bench; ~45 GB for the GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
export STREAMMERGE_BENCH_PYTHON="$(command -v "$PYTHON" || echo "$PYTHON")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
# The whole check stops at 7.5 minutes; gpu_check.py also spends its budget step by step.
exec timeout --kill-after=15 $((BUDGET + 20)) "$STREAMMERGE_BENCH_PYTHON" benchmarks/gpu_check.py \
    --out "$OUT" --budget-s "$BUDGET" "$@"
