#!/usr/bin/env bash
# The packaging stage of CI, as root: installs its tools, builds the amd64 and arm64 .deb files
# (release binaries, man pages, lintian) and runs the package tests, whose last line is
# "packaging: N passed, N failed". Usage: .ci/packaging.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/.ci/packaging-deps.sh"
"$repo/.ci/aarch64.sh" install
# Starts the Debian rootfs download early; the container test waits for it (flock). A failed
# build fails the stage here, with its log.
rootfs_log="$(mktemp)"
"$repo/tests/packaging/rootfs.sh" >"$rootfs_log" 2>&1 &
rootfs_pid=$!
"$repo/packaging/build-debs.sh"
if ! wait "$rootfs_pid"; then
    echo "packaging: building the test rootfs failed:" >&2
    cat "$rootfs_log" >&2
    exit 1
fi
rm -f "$rootfs_log"
"$repo/tests/packaging/run.sh"
