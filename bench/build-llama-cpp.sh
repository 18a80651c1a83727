#!/usr/bin/env bash
# Builds llama.cpp's own programs (llama-bench, llama-perplexity) and its shared
# library from the source vendored in llama-cpp-python's PyPI sdist, the version marengo is compared
# with. llama.cpp is measured only through these programs, never through a Python wrapper; the
# shared library, with the sdist's own ctypes binding, is there for reading llama.cpp's logits
# (tests/fixtures/smollm2/make_llama_cpp_reference.py), where no speed is involved. Beside the
# build, a venv with bench/requirements.txt: cmake, the GGUF writer's packages and the binding's.
#
#   bench/build-llama-cpp.sh [DIR]      (default DIR: target/llama.cpp in the repository)
#
# Idempotent: the sdist, the unpacked source and the build are kept in DIR and reused. Built for
# this CPU (GGML_NATIVE) but without AMX: the tile instructions fault where the kernel or the
# hypervisor does not enable them. Prints, on its last lines, where the programs and the library
# are, as shell assignments to eval: LLAMA_BIN (the programs and libllama.so), LLAMA_PYTHON (the
# venv's python), LLAMA_PY (the binding's source, for PYTHONPATH), LLAMA_VERSION.
# JOBS (default 2) and NICE (default 10) set the build's parallelism and niceness.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version=0.3.36
dir="${1:-$repo/target/llama.cpp}"
dir="$(mkdir -p "$dir" && cd "$dir" && pwd)"
jobs="${JOBS:-2}"
sdist="$dir/sdist/llama_cpp_python-$version.tar.gz"
src="$dir/llama_cpp_python-$version"
build="$dir/build"
targets=(llama llama-bench llama-perplexity)

# Only llama-cpp-python itself as source: pip prepares its metadata with its build backend, which
# may come as wheels (with :all: pip would build scikit-build-core and its dependencies too).
if [[ ! -f "$sdist" ]]; then
    python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$dir/sdist"
fi
[[ -d "$src/vendor/llama.cpp" ]] || tar -xzf "$sdist" -C "$dir"

venv="$dir/venv"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$repo/bench/requirements.txt" >&2
cmake="$venv/bin/cmake"

no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [[ ! -f "$build/CMakeCache.txt" ]]; then
    "$cmake" -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx"
fi
nice -n "${NICE:-10}" "$cmake" --build "$build" -j "$jobs" --target "${targets[@]}"

# The sdist records the llama.cpp commit it vendors in its changelog; the source has no .git.
commit="$(sed -n "/^## \[$version\]/,/^## /s/.*ggml-org\/llama.cpp@\([0-9a-f]*\).*/\1/p" "$src/CHANGELOG.md" | head -n1)"
echo "LLAMA_BIN=$build/bin"
echo "LLAMA_PYTHON=$venv/bin/python"
echo "LLAMA_PY=$src"
echo "LLAMA_VERSION='llama-cpp-python $version, ggml-org/llama.cpp@$commit'"
