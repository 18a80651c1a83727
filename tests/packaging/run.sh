#!/usr/bin/env bash
# Runs the package tests and prints their tally. Needs root, .ci/packaging-deps.sh, and the
# .deb files of packaging/build-debs.sh. Usage: tests/packaging/run.sh [TEST...]
# (TEST: units, policy, arm64, container; all of them by default)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PACKAGING_RESULTS="$(mktemp)"
export PACKAGING_RESULTS
trap 'rm -f "$PACKAGING_RESULTS"' EXIT

tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(units policy arm64 container)

for t in "${tests[@]}"; do
    echo "== packaging: $t"
    if ! "$here/$t.sh"; then
        echo "fail $t.sh exited non-zero" >> "$PACKAGING_RESULTS"
        echo "FAIL - $t.sh exited non-zero"
    elif ! grep -qx "done $t.sh" "$PACKAGING_RESULTS"; then
        echo "fail $t.sh stopped before its last check" >> "$PACKAGING_RESULTS"
        echo "FAIL - $t.sh stopped before its last check"
    fi
done

passed="$(grep -c '^pass ' "$PACKAGING_RESULTS")"
failed="$(grep -c '^fail ' "$PACKAGING_RESULTS")"
echo "packaging: $passed passed, $failed failed"
[[ "$failed" -eq 0 && "$passed" -gt 0 ]]
