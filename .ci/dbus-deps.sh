#!/usr/bin/env bash
# What the D-Bus tests run for real: dbus-daemon (a private bus per test, and Debian's
# /usr/share/dbus-1/system.conf for the system-like one), gdbus and busctl as shell clients,
# setpriv and useradd to act as other users; for the example clients of examples/clients/,
# the system python3 with PyGObject, gjs, and gdbus-codegen with the GLib headers and a C
# compiler. Idempotent: installs only what is missing.
set -euo pipefail

declare -A package_of=(
    [dbus-daemon]=dbus
    [gdbus]=libglib2.0-bin
    [busctl]=systemd
    [setpriv]=util-linux
    [useradd]=passwd
    [gjs]=gjs
    [gdbus-codegen]=libglib2.0-dev-bin
    [gcc]=gcc
    [make]=make
    [pkg-config]=pkg-config
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
if [[ ! -f /usr/include/glib-2.0/gio/gio.h ]]; then
    missing+=(libglib2.0-dev)
fi
# The system interpreter, not a venv's or pyenv's: python3-gi is built for it.
if ! /usr/bin/python3 -c 'import gi' >/dev/null 2>&1; then
    missing+=(python3 python3-gi)
fi
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)
fi
