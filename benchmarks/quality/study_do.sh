#!/usr/bin/env bash
# DO-Merging studied on the encoder suite (issue 17 item 2): orthogonalization strength, side,
# decouple on/off, λ grid — all on validation; then the variant that validation picks is merged
# at its validation λ and test is scored once (--select). Fig. 3 of the paper: each orthogonalized
# adapter scored alone (ortho_individual.py). Run after run_encoder_suite.sh's training stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-/work/main/.venv/bin/python}
Q=benchmarks/quality
CACHE=${CACHE:-$Q/.cache-encoder}
export STREAMMERGE_QUALITY_MAX_LEN=48 PYTHONPATH=$PWD
N="nice -n 10"

STRONG=steps=2000,mu=0.1,max_delta=0.5,on_max_delta=clip           # ~10× the default lr·steps budget, weaker penalty
VSTRONG=steps=2000,lr=3e-3,mu=0.01,max_delta=1,on_max_delta=clip   # as far as the factors are allowed to move
$N $PY $Q/run_merges.py --cache "$CACHE" --splits validation --lambdas 0.25,0.5,0.75,default \
    --configs do,do_ortho_only,do_decouple_only \
    --config "do_vstrong=do_merging:$VSTRONG" \
    --config "do_strong=do_merging:$STRONG"
# Which side: at λ 0.5 (the grid above decides whether that is near the best).
$N $PY $Q/run_merges.py --cache "$CACHE" --splits validation --lambdas 0.5 \
    --config "do_vstrong_A=do_merging:$VSTRONG,sides=A" \
    --config "do_vstrong_B=do_merging:$VSTRONG,sides=B"
# Fig. 3: each orthogonalized adapter alone.
for setting in "default:" "vstrong:$VSTRONG"; do
    name=${setting%%:*}; params=${setting#*:}
    $N $PY $Q/ortho_individual.py --cache "$CACHE" --name "$name" --splits validation,test \
        $(for kv in ${params//,/ }; do echo --param "$kv"; done)
done
# Test once per configuration, at its validation-best λ (the 0.5 key exists: only the selection runs).
$N $PY $Q/run_merges.py --cache "$CACHE" --lambdas 0.5 --splits validation --select \
    --configs do,do_ortho_only,do_decouple_only,do_vstrong,do_strong
