#!/usr/bin/env bash
# The whole test suite, from a fresh Debian bookworm machine (as root; a few minutes of setup
# the first time, then the builds): prerequisites, the x86_64 tests, the aarch64 tests under
# qemu-user, the .deb packages and their tests. Usage: ./test.sh
#
# Lints (`cargo clippy --workspace --all-targets -- -D warnings`) are kept clean by developers
# but not run here: a third, check-mode build of tract does not fit CI's time on 2 cores.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TERM_COLOR=never
stage() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

stage "prerequisites"
.ci/dbus-deps.sh
.ci/python-venv.sh
.ci/smollm2.sh >/dev/null
.ci/llama-vocab.sh >/dev/null

stage "format"
cargo fmt --all -- --check

stage "x86_64 tests: exporter, merge, engine, D-Bus service, SmolLM2 end to end"
cargo test --release --workspace
# The kernel tests pass with whichever instruction sets the CPU has: say which they covered.
cargo test --release --workspace --lib -- --exact kernels::tests::report_the_isas_covered --nocapture

# The kernels and the engine against its references, on aarch64 (NEON) under qemu-user. The
# bundles are made by the host's exporter: the file format does not depend on the machine.
stage "aarch64 tests under qemu-user: kernels, engine"
.ci/aarch64.sh install
MARENGO_EXPORT="$CARGO_TARGET_DIR/release/marengo-export" \
    .ci/aarch64.sh test --release --workspace --lib --test engine_matches_references
.ci/aarch64.sh test --release --workspace --lib -- --exact kernels::tests::report_the_isas_covered \
    --nocapture

stage "packages: amd64 and arm64 .deb, lintian, systemd units, policy, install in a container"
.ci/packaging.sh
stage "done"
