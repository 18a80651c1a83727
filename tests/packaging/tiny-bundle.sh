#!/usr/bin/env bash
# Makes the bundle the package tests serve: a small random Mistral-shaped model
# (tests/packaging/model-config.json: 4 layers, hidden 256, 4096 tokens of context, so that a
# long generation lasts long enough to be interrupted) with the real Mistral-7B tokenizer,
# written by the release marengo-export (`synth`, then `convert` to FP8).
# Usage: tests/packaging/tiny-bundle.sh OUT_DIR
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export_bin="${MARENGO_EXPORT:-${CARGO_TARGET_DIR:-$repo/target}/release/marengo-export}"
tokenizer_dir="$repo/tests/fixtures/mistral-7b-v0.1"
out="${1:?usage: tiny-bundle.sh OUT_DIR}"

checkpoint="$(mktemp -d)"
trap 'rm -rf "$checkpoint"' EXIT
"$export_bin" synth --config "$repo/tests/packaging/model-config.json" --out "$checkpoint" \
    --tokenizer "$tokenizer_dir/tokenizer.json"
cp "$tokenizer_dir/tokenizer_config.json" "$checkpoint/"
"$export_bin" convert "$checkpoint" --out "$out"
echo "$out"
