#!/usr/bin/env bash
# The unit files: the system unit's exposure as rated by `systemd-analyze security` is at most
# 1.0 (printed for CI's log, with the user unit's), and the system unit as the amd64 .deb
# installs it verifies without a word in a Debian tree (the package's files over the test rootfs).
# Usage: tests/packaging/units.sh   (as root: it mounts an overlay)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

max_exposure=1.0

# exposure UNITFILE: prints the "Overall exposure level" number.
exposure() {
    systemd-analyze security --offline=yes --no-pager "$1" 2>&1 \
        | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
}

system_exposure="$(exposure "$repo/systemd/marengod.service")"
user_exposure="$(exposure "$repo/systemd/user/marengod.service")"
echo "systemd-analyze security: system unit ${system_exposure:-?}, user unit ${user_exposure:-?}"

exposure_at_most() {
    [[ -n "$1" ]] || { echo "no exposure level in systemd-analyze's output"; return 1; }
    awk -v e="$1" -v max="$2" 'BEGIN { exit !(e <= max) }' || { echo "exposure $1 > $2"; return 1; }
}
check "system unit exposure $system_exposure <= $max_exposure" exposure_at_most "$system_exposure" "$max_exposure"

verify_installed_unit() {
    local deb rootfs work status=0
    deb="$(deb_of amd64)" || return 1
    rootfs="$("$repo/tests/packaging/rootfs.sh")" || return 1
    work="$(mktemp -d)"
    mkdir "$work/package" "$work/tree"
    dpkg-deb -x "$deb" "$work/package" || return 1
    # A read-only overlay: the package's files over the rootfs, which stays untouched.
    mount -t overlay overlay -o "lowerdir=$work/package:$rootfs" "$work/tree" || return 1
    silent systemd-analyze verify --man=no --root="$work/tree" \
        "$work/tree/usr/lib/systemd/system/marengod.service" || status=$?
    umount "$work/tree"
    rm -rf "$work"
    return "$status"
}
check "systemd-analyze verify of the installed marengod.service" verify_installed_unit

finished
