#!/usr/bin/env bash
# Installs what the package build and the package tests need: cargo-deb (builds the .deb files),
# systemd-container + debootstrap (boot the package in a Debian container), lintian, dpkg-dev,
# dbus (the policy test's private bus), qemu-user (runs the arm64 binaries), help2man
# (man pages from --help) and file (tells ELF architectures).
# Idempotent: returns at once when everything is already there. Usage: .ci/packaging-deps.sh
set -euo pipefail

packages=(systemd-container debootstrap lintian dpkg-dev dbus qemu-user help2man file)
cargo_deb_version=3.8.0

installed() {
    local p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
    done
}

if ! installed; then
    export DEBIAN_FRONTEND=noninteractive
    # Third-party sources may fail to refresh; the Debian indexes are what matters, so only
    # the install step's success is checked.
    apt-get -o DPkg::Lock::Timeout=600 update || true
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${packages[@]}"
fi

if ! cargo deb --version 2>/dev/null | grep -qF "$cargo_deb_version"; then
    # About five minutes on two cores: keep it polite to concurrent builds.
    nice -n 10 cargo install --locked cargo-deb --version "$cargo_deb_version"
fi
cargo deb --version
