# Shared by the package tests: check bookkeeping, paths, and the package files.
# Sourced, not run. Each check prints "ok - NAME" or "FAIL - NAME" with the output that failed
# it, and adds one line to $PACKAGING_RESULTS, which run.sh counts.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
debs="${DEB_DIR:-$repo/target/debian}"
: "${PACKAGING_RESULTS:=$(mktemp)}"
export PACKAGING_RESULTS

# finished: the last line of every test script, so that run.sh can tell a script that stopped
# early from one that ran all its checks.
finished() {
    echo "done $(basename "$0")" >> "$PACKAGING_RESULTS"
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

# expect_failure CMD...: succeeds when CMD fails; its output is passed through.
expect_failure() {
    if "$@"; then
        echo "expected a failure from: $*"
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
