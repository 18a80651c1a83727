#!/usr/bin/env bash
# The packaging stage of CI, as root: installs its tools, builds the amd64 and arm64 .deb files
# (release binaries, man pages, lintian) and runs the package tests, whose last line is
# "packaging: N passed, N failed". Usage: .ci/packaging.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/.ci/packaging-deps.sh"
"$repo/.ci/aarch64.sh" install
# Starts the Debian rootfs download early; the container test waits for it (flock).
"$repo/tests/packaging/rootfs.sh" >/dev/null 2>&1 &
"$repo/packaging/build-debs.sh"
wait
"$repo/tests/packaging/run.sh"
