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
    start="$(wc -l < "$PACKAGING_RESULTS")"
    status=0
    "$here/$t.sh" || status=$?
    # A script exits non-zero when one of its checks failed (already counted); anything else
    # is a failure of its own.
    failed="$(tail -n "+$((start + 1))" "$PACKAGING_RESULTS" | grep -c '^fail ' || true)"
    if ! grep -qx "done $t.sh" "$PACKAGING_RESULTS"; then
        echo "fail $t.sh stopped before its last check (exit status $status)" >> "$PACKAGING_RESULTS"
        echo "FAIL - $t.sh stopped before its last check (exit status $status)"
    elif [[ "$status" -ne 0 && "$failed" -eq 0 ]]; then
        echo "fail $t.sh exited with $status after passing its checks" >> "$PACKAGING_RESULTS"
        echo "FAIL - $t.sh exited with $status after passing its checks"
    fi
done

passed="$(grep -c '^pass ' "$PACKAGING_RESULTS")"
failed="$(grep -c '^fail ' "$PACKAGING_RESULTS")"
echo "packaging: $passed passed, $failed failed"
[[ "$failed" -eq 0 && "$passed" -gt 0 ]]
