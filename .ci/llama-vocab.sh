#!/usr/bin/env bash
# Fetches llama.cpp's Llama 3 and Qwen2 vocabulary files from the llama.cpp source vendored in the
# PyPI sdist of llama-cpp-python into a cache directory, and prints that directory. Each model is
# a vocabulary-only GGUF (ggml-vocab-NAME.gguf: the tokenizer metadata of Meta-Llama-3-8B and of
# Qwen1.5-7B, no tensors) with the test texts llama.cpp checks it on (.gguf.inp) and the ids
# HuggingFace's own tokenizer gives for them (.gguf.out, written by llama.cpp's
# convert_hf_to_gguf_update.py with AutoTokenizer). tests/tokenizers_and_templates.rs reads them.
#
# Idempotent: cached files with the pinned SHA-256s are reused without touching the network.
# Usage: .ci/llama-vocab.sh   (MARENGO_CACHE=... overrides the cache directory).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MARENGO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/marengo}/llama-vocab"
version="0.3.36"
sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
files=(
    "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e  ggml-vocab-llama-bpe.gguf"
    "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-llama-bpe.gguf.inp"
    "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b  ggml-vocab-llama-bpe.gguf.out"
    "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c  ggml-vocab-qwen2.gguf"
    "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0  ggml-vocab-qwen2.gguf.inp"
    "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363  ggml-vocab-qwen2.gguf.out"
)

checked() { (cd "$1" && printf '%s\n' "${files[@]}" | sha256sum --check --status); }

if [[ -d "$cache" ]] && checked "$cache"; then
    echo "$cache"
    exit 0
fi

# pip comes from the project's venv (.ci/python-venv.sh makes it, idempotently).
"$repo/.ci/python-venv.sh" >&2
python="$repo/.venv/bin/python"

mkdir -p "$(dirname "$cache")"
download="$(mktemp -d "$(dirname "$cache")/llama-vocab-download.XXXXXX")"
trap 'rm -rf "$download"' EXIT
# Only llama-cpp-python itself as source; pip prepares its metadata with its build backend,
# which comes as wheels.
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$download" >&2
sdist="$download/llama_cpp_python-$version.tar.gz"
if ! echo "$sdist_sha256  $sdist" | sha256sum --check --status; then
    echo "llama-vocab: llama-cpp-python==$version sdist does not have SHA-256 $sdist_sha256" >&2
    exit 1
fi
members=()
for line in "${files[@]}"; do
    members+=("llama_cpp_python-$version/vendor/llama.cpp/models/${line#*  }")
done
tar -xzf "$sdist" -C "$download" --strip-components=4 "${members[@]}"
if ! checked "$download"; then
    echo "llama-vocab: the files unpacked from the sdist do not have their pinned SHA-256s" >&2
    exit 1
fi
rm -rf "$cache"
mkdir "$cache"
for line in "${files[@]}"; do
    mv "$download/${line#*  }" "$cache/"
done
echo "$cache"
