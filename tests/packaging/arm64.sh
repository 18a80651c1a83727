#!/usr/bin/env bash
# The arm64 .deb: built for arm64, holds the same files as the amd64 one (which the container
# test installs and exercises), its programs are aarch64 ELF executables, and they run under
# qemu-user.
# Usage: tests/packaging/arm64.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The cross toolchain's loader and libc, from one package (see .ci/aarch64.sh).
sysroot=/usr/aarch64-linux-gnu
programs=(marengod marengoctl marengo-export)
arm64="$(deb_of arm64)"
amd64="$(deb_of amd64)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

check "the arm64 package's Architecture is arm64" contains arm64 dpkg-deb -f "$arm64" Architecture

# paths DEB: the paths a package installs, as dpkg-deb -c lists them.
paths() {
    dpkg-deb -c "$1" | awk '{ print $6 }' | sort
}
same_paths() {
    diff <(paths "$amd64") <(paths "$arm64")
}
check "the arm64 package holds the same paths as the amd64 one" same_paths

has_programs() {
    local listing p
    listing="$(paths "$arm64")"
    for p in "${programs[@]}"; do
        grep -qx "./usr/bin/$p" <<<"$listing" || { echo "no /usr/bin/$p in $arm64"; return 1; }
    done
}
check "the arm64 package installs ${programs[*]}" has_programs

dpkg-deb -x "$arm64" "$work"
for p in "${programs[@]}"; do
    check "$p is an aarch64 ELF executable" contains "ARM aarch64" file -L "$work/usr/bin/$p"
    check "$p --help runs under qemu-aarch64" contains "Usage:" \
        qemu-aarch64 -L "$sysroot" -E LD_LIBRARY_PATH="$sysroot/lib" "$work/usr/bin/$p" --help
done

finished
