#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine (as root; a few minutes of setup
# the first time, then the builds): prerequisites, the x86_64 tests, the aarch64 tests under
# qemu-user, the .deb packages and their tests. Usage: ./test.sh
#
# Lints (`cargo clippy --workspace --all-targets -- -D warnings`) are kept clean by developers
# but not run here: a second, check-mode build of tract does not fit CI's time on 2 cores.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TERM_COLOR=never
stage() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

stage "prerequisites"
.ci/setup.sh
# The Debian rootfs for the container test downloads while the code builds.
tests/packaging/rootfs.sh >/dev/null 2>&1 &
rootfs=$!

stage "format"
cargo fmt --all -- --check

stage "x86_64 tests"
cargo test --release --workspace

stage "aarch64 tests under qemu-user"
# The engine test makes its bundles with the host's exporter (the bundle is the same) and
# compares with onnxruntime in the host's Python venv.
MARENGO_EXPORT="$CARGO_TARGET_DIR/release/marengo-export" \
    .ci/aarch64.sh test --release --lib --test engine_matches_references

stage "packages"
wait "$rootfs" || true
packaging/build-debs.sh
tests/packaging/run.sh
stage "done"
