#!/usr/bin/env bash
# Creates the Python venv the tests use as reference engine ($REPO/.venv with onnxruntime + numpy,
# pinned in tests/python/requirements.txt). Idempotent: when the venv already holds exactly those
# requirements it returns at once. Usage: .ci/python-venv.sh  (no arguments; VENV=... overrides).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
requirements="$repo/tests/python/requirements.txt"
stamp="$venv/.marengo-requirements"

ready() {
    [[ -x "$venv/bin/python" ]] && cmp -s "$requirements" "$stamp" \
        && "$venv/bin/python" -c 'import onnxruntime, numpy' 2>/dev/null
}
ready && exit 0
# Scripts that need the venv (e.g. .ci/smollm2.sh) call this one too: build it once at a time.
exec 9<"${BASH_SOURCE[0]}"
flock 9
ready && exit 0

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
    echo "python-venv: $python not found; installing python3" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
fi
# Debian's python3 ships venv without ensurepip until python3-venv is installed.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "python-venv: $python lacks ensurepip; installing python3-venv" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
"$venv/bin/python" -c 'import onnxruntime, numpy; print("python-venv: onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'
cp "$requirements" "$stamp"
