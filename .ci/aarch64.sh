#!/usr/bin/env bash
# Cross-build and test marengo for aarch64-unknown-linux-gnu, running the test binaries under
# qemu-user, so that the NEON kernels are exercised on x86_64 machines and CI.
#
#   .ci/aarch64.sh install                 install the Debian cross toolchain (idempotent)
#   .ci/aarch64.sh test [cargo test args]  e.g. `.ci/aarch64.sh test --lib kernels`
#   .ci/aarch64.sh build [cargo args]      any cargo subcommand works the same way
#
# Debian bookworm's own rustc/cargo (the `-web` packages) are used rather than rustup: they ship
# the aarch64 standard library as a Debian package, so no download outside apt is needed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu
packages=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)

installed() {
    local p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
    done
}

install() {
    if installed; then
        return 0
    fi
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Third-party sources without an arm64 index fail to update once arm64 is added; the
    # Debian indexes are what matters, so only the install step's success is checked.
    apt-get -o DPkg::Lock::Timeout=600 update || true
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${packages[@]}"
}

if [[ $# -lt 1 ]]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi

command="$1"
shift
install
if [[ "$command" == install ]]; then
    /usr/bin/cargo --version
    exit 0
fi

# rustup's proxies may come first on PATH: pin Debian's compiler, which has the arm64 std.
export RUSTC=/usr/bin/rustc
export RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# The loader and libc must come from the same package: libc6-arm64-cross's ld.so with the
# multiarch libc6:arm64 (pulled in by libstd-rust-web-dev:arm64, a different build) hangs in
# pthread_create, so the library path is pinned to the cross sysroot too.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

cd "$repo"
exec /usr/bin/cargo "$command" --target "$target" "$@"
