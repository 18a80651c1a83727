#!/usr/bin/env bash
# marengo against llama.cpp's own llama-bench, on the same machine, threads and weights, at three
# model sizes. Each shape (SmolLM2-135M, TinyLlama-1.1B, Mistral-7B) is written once with random
# weights as a llama.cpp Q8_0 GGUF (bench/make_q8_0_gguf.py) and exported from that file by
# marengo-export to an FP8 bundle. For each size, in the same minutes: llama-bench's prompt runs,
# marengo-bench, llama-bench's decode runs; then a table (bench/side_by_side_report.py) of decode
# tok/s at positions 16 and 1024, the time of 5-, 32-, 128- and 512-token prompts, the ratios
# marengo / llama.cpp, and decode's fraction of the measured read bandwidth.
#
#   bench/side-by-side.sh [WORK_DIR]
#   e.g. SHAPES=smollm2-135m bench/side-by-side.sh /var/tmp/side-by-side
#
# SHAPES (default: smollm2-135m tinyllama-1.1b mistral-7b), THREADS (2), REPS (3: repetitions of
# each figure on both sides, averaged), LLAMA_DIR (llama.cpp's build, target/llama.cpp). llama.cpp is
# built from the llama-cpp-python sdist by bench/build-llama-cpp.sh (once; a long build on two
# cores). The 7B shape needs about 16 GB of disk in WORK_DIR (default: target/side-by-side) and as
# much free memory for the page cache if the figures are to be memory-bound rather than disk-bound.
# SmolLM2's shape copies the tokenizer of SmolLM2's GGUF (.ci/smollm2.sh fetches it once).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$repo/target/side-by-side}"
shapes="${SHAPES:-smollm2-135m tinyllama-1.1b mistral-7b}"
threads="${THREADS:-2}"
reps="${REPS:-3}"
prompts=5,32,128,512
decode_tokens=16
short=16
long=1024
mkdir -p "$work"

eval "$("$repo/bench/build-llama-cpp.sh" "${LLAMA_DIR:-$repo/target/llama.cpp}" | tail -n 4)"
echo "llama.cpp: $LLAMA_VERSION ($LLAMA_BIN)"
(cd "$repo" && cargo build --release -p marengo-export -p marengo --bin marengo-export --bin marengo-bench)
target="${CARGO_TARGET_DIR:-$repo/target}/release"

for shape in $shapes; do
    gguf="$work/$shape-q8_0.gguf"
    bundle="$work/$shape-fp8"
    runs="$work/$shape-runs"
    vocab=()
    [[ "$shape" == smollm2-135m ]] && vocab=(--vocab "$("$repo/.ci/smollm2.sh")")
    [[ -f "$gguf" ]] || "$LLAMA_PYTHON" "$repo/bench/make_q8_0_gguf.py" "$gguf" --shape "$shape" "${vocab[@]}"
    [[ -f "$bundle/bundle.json" ]] || "$target/marengo-export" convert --gguf "$gguf" --out "$bundle"
    mkdir -p "$runs"

    "$LLAMA_BIN/llama-bench" -m "$gguf" -t "$threads" -r "$reps" -p "$prompts" -n 0 -o json \
        >"$runs/llama-prompt.json"
    "$target/marengo-bench" --bundle "$bundle" --threads "$threads" --repetitions "$reps" --warmup \
        --prompt-tokens "$prompts" --decode-tokens "$decode_tokens" \
        --short-position "$short" --long-position "$long" | tail -n 1 >"$runs/marengo.json"
    "$LLAMA_BIN/llama-bench" -m "$gguf" -t "$threads" -r "$reps" -p 0 -n "$decode_tokens" \
        -d "$short,$long" -o json >"$runs/llama-decode.json"

    "$LLAMA_PYTHON" "$repo/bench/side_by_side_report.py" "$shape" "$gguf" \
        "$runs/llama-prompt.json" "$runs/llama-decode.json" "$runs/marengo.json"
done
