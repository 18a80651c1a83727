#!/usr/bin/env bash
# marengo against llama.cpp on the same machine, threads and weights: a random Mistral-7B-shaped
# model written once as a llama.cpp Q8_0 GGUF (bench/make_q8_0_gguf.py) and exported from that
# file by marengo-export to an FP8 bundle; marengo-bench then measures both (llama.cpp through
# bench/llama_bench.py) and prints the ratios.
#
#   bench/side-by-side.sh [WORK_DIR] [marengo-bench options]
#   e.g. bench/side-by-side.sh /var/tmp/marengo-bench --prompt-tokens 512 --decode-tokens 16
#
# Needs about 16 GB of disk in WORK_DIR (default: target/side-by-side) and as much free memory
# for the page cache if the figures are to be memory-bound rather than disk-bound. llama.cpp is
# built from llama-cpp-python's source for this CPU (-march=native, a few minutes on 2 cores),
# without AMX: the tile instructions fault where the kernel or hypervisor does not enable them.
# SHAPE=small makes a 2-layer model instead, to check the script in a minute.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$repo/target/side-by-side}"
shift || true
shape="${SHAPE:-mistral-7b}"
threads="${THREADS:-2}"
venv="$work/llama-venv"
gguf="$work/$shape-q8_0.gguf"
bundle="$work/$shape-fp8"
mkdir -p "$work"

if ! "$venv/bin/python" -c 'import llama_cpp, gguf, numpy' 2>/dev/null; then
    python3 -m venv "$venv"
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$venv/bin/pip" install --no-cache-dir -r "$repo/bench/requirements.txt"
fi
"$venv/bin/python" -c 'import llama_cpp; print("llama.cpp:", llama_cpp.llama_print_system_info().decode())'

(cd "$repo" && cargo build --release -p marengo-export -p marengo --bin marengo-export --bin marengo-bench)
target="${CARGO_TARGET_DIR:-$repo/target}/release"
[[ -f "$gguf" ]] || "$venv/bin/python" "$repo/bench/make_q8_0_gguf.py" "$gguf" --shape "$shape"
[[ -f "$bundle/bundle.json" ]] || "$target/marengo-export" convert --gguf "$gguf" --out "$bundle"

# llama_bench.py runs with the venv's python3 (its #! line looks python3 up on PATH).
PATH="$venv/bin:$PATH" "$target/marengo-bench" --bundle "$bundle" --threads "$threads" \
    --long-position 0 --llama-bench "$repo/bench/llama_bench.py" --llama-model "$gguf" "$@"
