#!/usr/bin/env bash
# Build the llama.cpp tools tests/test_llamacpp.py and benchmarks/bench_llamacpp.py run, from the copy of llama.cpp
# vendored in llama-cpp-python's source distribution (a pinned, pip-downloadable llama.cpp release).
#
#   benchmarks/build_llamacpp.sh                         # into ~/.cache/llava-ext/llama.cpp-0.3.36
#   benchmarks/build_llamacpp.sh /opt/llama.cpp          # into another directory
#   benchmarks/build_llamacpp.sh --source DIR BUILD_DIR  # an unpacked sdist already here: no download
#   LLAVA_EXT_LLAMA_CPP=BUILD_DIR/bin pytest -m slow tests/test_llamacpp.py
#
# Builds (CPU, Release, GGML_NATIVE) llama-mtmd-cli, llama-bench, llama-quantize and llava-ext-probe
# (benchmarks/llamacpp_probe.cpp: logits and image embeddings through llama.cpp's C API) into BUILD_DIR/bin.
# About 10-15 minutes on 2 cores; re-running it only builds what changed. Needs pip, cmake (>= 3.14), a C++17
# compiler. JOBS (default: the CPU count) sets the parallel build jobs.
set -euo pipefail

VERSION=0.3.36  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp the tests were written against
TARGETS=(llama-mtmd-cli llama-bench llama-quantize)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

source_dir=""
if [[ "${1:-}" == "--source" ]]; then
    source_dir="$(cd "$2" && pwd)"
    shift 2
fi
if [[ "${1:-}" == -* ]]; then
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
fi
build_dir="${1:-$HOME/.cache/llava-ext/llama.cpp-$VERSION}"
mkdir -p "$build_dir"
build_dir="$(cd "$build_dir" && pwd)"

if [[ -z "$source_dir" ]]; then
    source_dir="$build_dir/llama_cpp_python-$VERSION"
    if [[ ! -f "$source_dir/vendor/llama.cpp/CMakeLists.txt" ]]; then
        echo "downloading the llama-cpp-python $VERSION source distribution"
        python -m pip download --quiet --no-deps --no-binary :all: --dest "$build_dir" "llama-cpp-python==$VERSION"
        tar -xzf "$build_dir/llama_cpp_python-$VERSION.tar.gz" -C "$build_dir"
    fi
fi
llama_cpp="$source_dir/vendor/llama.cpp"
if [[ ! -f "$llama_cpp/CMakeLists.txt" ]]; then
    echo "error: $llama_cpp/CMakeLists.txt not found; --source takes an unpacked llama-cpp-python sdist" >&2
    exit 1
fi

cmake -S "$llama_cpp" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF > "$build_dir/cmake-configure.log"
cmake --build "$build_dir" --config Release -j "${JOBS:-$(nproc)}" --target "${TARGETS[@]}"

# the probe links the shared libraries the tools use; the rpath lets it run without LD_LIBRARY_PATH
"${CXX:-c++}" -O2 -std=c++17 "$HERE/llamacpp_probe.cpp" -o "$build_dir/bin/llava-ext-probe" \
    -I"$llama_cpp/include" -I"$llama_cpp/ggml/include" -I"$llama_cpp/tools/mtmd" \
    -L"$build_dir/bin" -lmtmd -lllama -lggml -lggml-base -Wl,-rpath,"$build_dir/bin"

echo
echo "llama.cpp (llama-cpp-python $VERSION) tools in $build_dir/bin:"
for tool in "${TARGETS[@]}" llava-ext-probe; do
    echo "  $build_dir/bin/$tool"
done
if [[ "$build_dir" != "$HOME/.cache/llava-ext/llama.cpp-$VERSION" ]]; then
    echo "point the slow tests and the benchmark at them: export LLAVA_EXT_LLAMA_CPP=$build_dir/bin"
fi
