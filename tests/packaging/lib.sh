# Shared by the package tests: check bookkeeping, paths, and the package files.
# Sourced, not run. Each check prints "ok - NAME" or "FAIL - NAME" with the output that failed
# it, and adds one line to $PACKAGING_RESULTS, which run.sh counts. A script run on its own
# (without run.sh) gets a results file of its own, and exits non-zero when a check failed.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
debs="${DEB_DIR:-$repo/target/debian}"
: "${PACKAGING_RESULTS:=$(mktemp)}"
export PACKAGING_RESULTS
# The results of this script are the lines after this one (run.sh shares the file between
# scripts; checks run in subshells record their results there too).
packaging_results_start="$(wc -l < "$PACKAGING_RESULTS")"

# finished: the last line of every test script, so that run.sh can tell a script that stopped
# early from one that ran all its checks. Prints the script's tally and fails when any of its
# checks failed: as the script's last command, that is the script's exit status.
finished() {
    local script results passed failed
    script="$(basename "$0")"
    results="$(tail -n "+$((packaging_results_start + 1))" "$PACKAGING_RESULTS")"
    passed="$(grep -c '^pass ' <<<"$results" || true)"
    failed="$(grep -c '^fail ' <<<"$results" || true)"
    echo "done $script" >> "$PACKAGING_RESULTS"
    echo "$script: $passed passed, $failed failed"
    [[ "$failed" -eq 0 ]]
}

# check NAME CMD...: runs CMD, records and prints whether it succeeded.
# (Its locals have odd names: bash scoping is dynamic, CMD sees them.)
check() {
    local check_name="$1" check_output
    shift
    if check_output="$("$@" 2>&1)"; then
        echo "ok - $check_name"
        echo "pass $check_name" >> "$PACKAGING_RESULTS"
    else
        echo "FAIL - $check_name"
        printf '%s\n' "$check_output" | sed 's/^/    /'
        echo "fail $check_name" >> "$PACKAGING_RESULTS"
    fi
}

# expect_failure CMD...: succeeds when CMD ran and failed (exit status 1 to 124); its output is
# passed through. A status that says CMD did not run at all fails it like a success does: 125
# (the runner could not reach the place CMD runs in, as `inside` reports a container that is
# gone), 126 and 127 (not executable, not found), above 128 (killed by a signal).
expect_failure() {
    local status=0
    "$@" || status=$?
    if [[ "$status" -eq 0 ]]; then
        echo "expected a failure from: $*"
        return 1
    fi
    if [[ "$status" -ge 125 ]]; then
        echo "did not run (exit status $status): $*"
        return 1
    fi
    return 0
}

# silent CMD...: succeeds when CMD succeeds and prints nothing (systemd-analyze verify reports
# unknown keys and bad values as warnings and still exits 0).
silent() {
    local out
    out="$("$@" 2>&1)" || { printf '%s\n' "$out"; return 1; }
    [[ -z "$out" ]] || { printf '%s\n' "$out"; return 1; }
}

# contains NEEDLE CMD...: succeeds when CMD succeeds and prints NEEDLE.
contains() {
    local needle="$1" out
    shift
    out="$("$@" 2>&1)" || { printf '%s\n' "$out"; return 1; }
    printf '%s\n' "$out"
    grep -qF -- "$needle" <<<"$out"
}

# fails_with NEEDLE CMD...: succeeds when CMD fails and prints NEEDLE.
fails_with() {
    local needle="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        printf '%s\n' "$out"
        echo "expected a failure from: $*"
        return 1
    fi
    printf '%s\n' "$out"
    grep -qF -- "$needle" <<<"$out"
}

# model_deb: the one model package (architecture all) in $debs.
model_deb() {
    local found
    found=("$debs"/marengo-model-smollm2_*_all.deb)
    if [[ ${#found[@]} -ne 1 || ! -f "${found[0]}" ]]; then
        echo "no single marengo-model-smollm2_*_all.deb in $debs (run packaging/build-debs.sh)" >&2
        return 1
    fi
    echo "${found[0]}"
}

# The one .deb of ARCH in $debs.
deb_of() {
    local arch="$1" found
    found=("$debs"/marengo_*_"$arch".deb)
    if [[ ${#found[@]} -ne 1 || ! -f "${found[0]}" ]]; then
        echo "no single marengo_*_$arch.deb in $debs (run packaging/build-debs.sh)" >&2
        return 1
    fi
    echo "${found[0]}"
}
