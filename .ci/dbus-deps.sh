#!/usr/bin/env bash
# What the D-Bus tests run for real: dbus-daemon (a private bus per test, and Debian's
# /usr/share/dbus-1/system.conf for the system-like one), gdbus and busctl as shell clients,
# setpriv and useradd to act as other users. Idempotent: installs only what is missing.
set -euo pipefail

declare -A package_of=(
    [dbus-daemon]=dbus
    [gdbus]=libglib2.0-bin
    [busctl]=systemd
    [setpriv]=util-linux
    [useradd]=passwd
)
missing=()
for command in "${!package_of[@]}"; do
    if ! command -v "$command" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$command ]]; then
        missing+=("${package_of[$command]}")
    fi
done
if [[ ! -f /usr/share/dbus-1/system.conf ]]; then
    missing+=(dbus)
fi
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)
fi
