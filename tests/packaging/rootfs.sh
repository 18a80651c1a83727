#!/usr/bin/env bash
# Builds (once) the Debian bookworm root file system that the package test boots with
# systemd-nspawn, and prints its path. The tree is cached outside the repository
# (ROOTFS_CACHE, default /var/cache/marengo-ci) and rebuilt only when the package list below
# changes. The mirror is the one apt on this machine uses, read from its sources at run time.
# Usage: tests/packaging/rootfs.sh   (as root; about two minutes the first time)
set -euo pipefail

cache="${ROOTFS_CACHE:-/var/cache/marengo-ci}"
rootfs="$cache/rootfs"
suite=bookworm
include=systemd,systemd-sysv,dbus,libpam-systemd
stamp="$rootfs/.marengo-rootfs"
wanted="$suite $include"

# The first Debian archive URI among apt's sources: deb822 files (URIs:) and one-line lists.
debian_mirror() {
    local files=() uri
    shopt -s nullglob
    files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list)
    shopt -u nullglob
    for uri in $(awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }
                      /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
                      "${files[@]}" 2>/dev/null); do
        case "$uri" in
            *security*) ;;
            */debian | */debian/) echo "${uri%/}"; return 0 ;;
        esac
    done
    return 1
}

mkdir -p "$cache"
# One build at a time: a second caller waits for the first and then finds the tree ready.
exec 9>"$cache/rootfs.lock"
flock 9

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "$rootfs"
    exit 0
fi

# A build that was killed may have left /proc or /sys mounted inside its tree.
unmount_below() {
    local mounts
    mounts="$(awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)"
    [[ -z "$mounts" ]] || umount $mounts
}
trap 'unmount_below "$rootfs.tmp"' EXIT

mirror="$(debian_mirror)" || { echo "rootfs: no Debian mirror found in apt's sources" >&2; exit 1; }
echo "rootfs: debootstrap $suite from $mirror into $rootfs" >&2
unmount_below "$rootfs.tmp"
rm -rf "$rootfs.tmp" "$rootfs"
debootstrap --variant=minbase --include="$include" "$suite" "$rootfs.tmp" "$mirror" >&2
# A container boots faster and quieter without these; none matters to the package test.
chroot "$rootfs.tmp" systemctl mask --quiet systemd-timesyncd.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
chroot "$rootfs.tmp" apt-get clean
echo "$wanted" > "$rootfs.tmp/.marengo-rootfs"
mv "$rootfs.tmp" "$rootfs"
echo "$rootfs"
