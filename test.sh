#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine (as root; a few minutes of setup
# the first time, then the builds): prerequisites, the x86_64 tests, the aarch64 tests under
# qemu-user, the .deb packages and their tests. Usage: ./test.sh
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

stage "format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

stage "x86_64 tests"
cargo test --release --workspace

stage "aarch64 tests under qemu-user"
.ci/aarch64.sh test --release --lib

stage "packages"
wait "$rootfs" || true
packaging/build-debs.sh
tests/packaging/run.sh
stage "done"
