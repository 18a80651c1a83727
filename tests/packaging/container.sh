#!/usr/bin/env bash
# The amd64 .deb and the model package in a Debian bookworm booted with systemd as PID 1
# (systemd-nspawn, one throw-away boot over the cached rootfs of rootfs.sh): they install
# without enabling or starting anything; `marengoctl chat` then answers with the packaged model
# and no configuration at all; `systemctl start` reaches active through READY=1 and the daemon runs as
# marengo; over the real system bus a member of the group marengo gets an answer and another
# user is refused; D-Bus activation starts the stopped service on a call; `systemctl stop`
# mid-generation ends the stream with reason "shutdown"; `dpkg --purge` leaves no file, user
# or unit behind. Also prints the daemon's memory use with the model mapped.
# Usage: tests/packaging/container.sh   (as root)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

deb="$(deb_of amd64)"
model_deb="$(model_deb)"
rootfs="$("$repo/tests/packaging/rootfs.sh")"
work="$(mktemp -d)"
chmod 755 "$work"
machine="marengo-ci-$$"
nspawn_pid=""
container_pid=""

cleanup() {
    if [[ -n "$container_pid" ]] && kill -0 "$container_pid" 2>/dev/null; then
        nsenter -t "$container_pid" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
    if [[ -n "$nspawn_pid" ]]; then
        local i
        for i in $(seq 1 50); do
            kill -0 "$nspawn_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# What the container gets from here, read-only under /mnt/marengo-test.
cp "$deb" "$work/marengo.deb"
cp "$model_deb" "$work/marengo-model-smollm2.deb"
"$repo/tests/packaging/tiny-bundle.sh" "$work/bundle" >/dev/null
chmod -R a+rX "$work/bundle"

systemd-nspawn -q -D "$rootfs" --volatile=overlay -b --register=no --keep-unit \
    --console=read-only --machine="$machine" --bind-ro="$work:/mnt/marengo-test" \
    >"$work/console.log" 2>&1 &
nspawn_pid=$!

# inside CMD...: runs CMD inside the container as root, with a clean environment. When CMD
# fails and the container cannot be entered any more, exits 125 (not CMD's own failure), so
# that expect_failure cannot pass because the container is gone.
inside() {
    local status=0
    nsenter -t "$container_pid" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@" \
        || status=$?
    if [[ "$status" -ne 0 ]] && ! nsenter -t "$container_pid" -a true 2>/dev/null; then
        echo "the container (PID ${container_pid:-none}) cannot be entered" >&2
        return 125
    fi
    return "$status"
}
# as USER CMD...: runs CMD inside the container as USER.
as() {
    local user="$1"
    shift
    inside setpriv --reuid="$user" --regid="$user" --init-groups -- "$@"
}

# nspawn's child becomes the container's PID 1 once it has set the namespaces up. (Checks run
# in a subshell: what they set does not outlive them, so this runs outside of one.)
for i in $(seq 1 300); do
    container_pid="$(ps --ppid "$nspawn_pid" -o pid=,comm= | awk '$2 == "systemd" { print $1 }')" || true
    [[ -z "$container_pid" ]] || break
    sleep 0.1
done

booted() {
    local i
    [[ -n "$container_pid" ]] || { echo "no systemd in the container"; cat "$work/console.log"; return 1; }
    # Until systemd listens on its socket, systemctl cannot even ask: it then answers "offline"
    # (or nothing) at once, and must ask again. Only after that does --wait wait for the boot.
    # Stopping at the first "offline" let the later snapshots race the rest of the boot.
    local state=""
    for i in $(seq 1 600); do
        state="$(timeout 120 nsenter -t "$container_pid" -a systemctl is-system-running --wait 2>/dev/null)" || true
        [[ -z "$state" || "$state" == offline || "$state" == unknown ]] || break
        sleep 0.1
    done
    echo "system state: $state"
    [[ "$state" == running ]] || { inside systemctl --failed --no-pager; return 1; }
}
check "the container boots with systemd as PID 1" booted
[[ -n "$container_pid" ]] || exit 1

# Every path under the directories a package may touch, to compare before and after.
snapshot() {
    inside find /etc /usr /var/lib -xdev -not -path '/var/lib/dpkg/*' | sort
}
inside useradd --create-home alice
inside useradd --create-home bob
snapshot > "$work/before"

check "dpkg -i installs the package" inside dpkg -i /mnt/marengo-test/marengo.deb
check "dpkg -i installs the model package" \
    inside dpkg -i /mnt/marengo-test/marengo-model-smollm2.deb
snapshot > "$work/installed"
# The snapshots see what the package adds, so that an empty difference after purge means something.
listed() {
    local path
    for path in /usr/bin/marengod /etc/marengo/marengod.toml /var/lib/marengo/models \
        /usr/share/marengo/models/smollm2/bundle.json; do
        grep -qx "$path" "$work/installed" || { echo "$path not in the snapshot"; return 1; }
    done
}
check "the snapshot sees the package's files, config and data directory" listed
check "the user and group marengo exist" inside sh -c 'getent passwd marengo && getent group marengo'
check "the service is neither enabled nor started" \
    contains "disabled inactive" inside sh -c \
    'echo "$(systemctl is-enabled marengod.service) $(systemctl is-active marengod.service)"'
check "systemd-analyze verify of the installed system unit" \
    silent inside systemd-analyze verify --man=no marengod.service
check "systemd-analyze verify of the installed user unit" \
    silent as alice sh -c 'XDG_RUNTIME_DIR="$(mktemp -d)" systemd-analyze verify --user --man=no marengod.service'
check "the bundle directory exists" inside test -d /var/lib/marengo/models
check "the config is a conffile" contains /etc/marengo/marengod.toml \
    inside dpkg-query -W -f='${Conffiles}' marengo

# The first run: nothing configured, no bundle copied. The call starts the service through
# D-Bus activation, and it serves the packaged model.
chat_out_of_the_box() {
    local answer
    answer="$(inside sh -c 'echo "What is the capital of France?" |
        timeout 300 marengoctl chat --temperature 0 --max-tokens 16')" ||
        { inside journalctl -u marengod --no-pager; return 1; }
    echo "answer: $answer"
    [[ -n "${answer//[[:space:]]/}" ]]
}
check "marengoctl chat answers with the packaged model and no configuration" chat_out_of_the_box
check "marengoctl models lists the packaged model as the default, loaded" \
    contains "default, loaded" inside marengoctl models
inside systemctl stop marengod.service

# From here on the tiny bundle, the first models directory's, is the default: quick answers.
inside cp -r /mnt/marengo-test/bundle /var/lib/marengo/models/default
inside usermod -a -G marengo alice

started() {
    inside timeout 120 systemctl start marengod.service || { inside journalctl -u marengod --no-pager; return 1; }
    inside systemctl show -p ActiveState -p SubState -p Type -p NotifyAccess -p StatusText marengod
    [[ "$(inside systemctl is-active marengod.service)" == active ]]
}
check "systemctl start marengod reaches active (Type=notify: READY=1 was sent)" started

main_pid() {
    inside systemctl show -P MainPID marengod.service
}
runs_as_marengo() {
    local pid
    pid="$(main_pid)"
    inside grep -E '^(Uid|Gid):' "/proc/$pid/status"
    [[ "$(inside stat -c %U "/proc/$pid")" == marengo ]]
}
check "the daemon runs as the user marengo" runs_as_marengo

# rss PID: resident memory as /proc shows it, for the report.
rss() {
    inside grep -E '^(VmRSS|RssAnon|RssFile):' "/proc/$1/status" | tr -s ' \t' ' ' | tr '\n' ' '
}
echo "memory after start (model mapped, no request yet): $(rss "$(main_pid)")"

complete_as() {
    as "$1" busctl --system call org.marengo.Llm1 /org/marengo/Llm1 org.marengo.Llm1 \
        Complete 'sa{sv}' "Once upon a time" 1 max_tokens u 8
}
check "a member of the group marengo gets an answer over the system bus" \
    contains 'sa{sv} "' complete_as alice
check "root gets an answer" contains 'sa{sv} "' complete_as root
check "another user is refused by the bus" fails_with "Access denied" complete_as bob
echo "memory after a request: $(rss "$(main_pid)")"

# A session bus without a systemd user manager runs the activation file's Exec= line; with no
# settings file of the user's, it serves the models of the system's models directories. The bus (and so the daemon it starts)
# writes to /dev/null, so that a daemon outliving its session cannot hold this check's pipe;
# it must not outlive it, which is checked next.
session_activated() {
    as bob env HOME=/home/bob sh -c '
        out="$(mktemp)" &&
        timeout 120 dbus-run-session -- sh -c "busctl --user call org.marengo.Llm1 \
            /org/marengo/Llm1 org.marengo.Llm1 Complete \"sa{sv}\" \"Once upon a time\" 1 \
            max_tokens u 8 > $out" >/dev/null 2>&1
        status=$?; cat "$out"; rm -f "$out"; exit $status'
}
check "a call on a session bus starts marengod --session through D-Bus activation" \
    contains 'sa{sv} "' session_activated

# bob_daemons: the pids of bob's marengod processes (the rootfs has no procps).
bob_daemons() {
    inside sh -c 'for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2>/dev/null)" = marengod ] && [ "$(stat -c %U "$d")" = bob ] &&
            echo "${d#/proc/}"
    done; true'
}
session_daemon_gone() {
    local i
    for i in $(seq 1 100); do
        [[ -n "$(bob_daemons)" ]] || return 0
        sleep 0.1
    done
    echo "marengod --session still runs 10 s after its session bus ended: $(bob_daemons)"
    return 1
}
check "the session's marengod ends with its session bus" session_daemon_gone

activated() {
    inside systemctl stop marengod.service
    [[ "$(inside systemctl is-active marengod.service)" != active ]] || return 1
    complete_as alice || return 1
    [[ "$(inside systemctl is-active marengod.service)" == active ]]
}
check "a call starts the stopped service through D-Bus activation" activated

# marengoctl, the packaged client, streams a long generation as alice; with --stats it prints
# the reason of the Finished signal it receives.
stopped_mid_generation() {
    as alice marengoctl --system generate --stats --max-tokens 4000 "Once upon a time" \
        >"$work/generate.out" 2>"$work/generate.err" &
    local client=$! i status=0
    for i in $(seq 1 300); do
        [[ ! -s "$work/generate.out" ]] || break
        sleep 0.1
    done
    [[ -s "$work/generate.out" ]] || { echo "no text within 30 s"; cat "$work/generate.err"; return 1; }
    inside systemctl stop marengod.service
    wait "$client" || status=$?
    echo "marengoctl exited with $status after $(wc -c < "$work/generate.out") bytes of text"
    cat "$work/generate.err"
    grep -q '^reason=shutdown' "$work/generate.err"
}
check "systemctl stop mid-generation ends the stream with reason shutdown" stopped_mid_generation

purged() {
    inside dpkg --purge marengo-model-smollm2 marengo || return 1
    snapshot > "$work/after"
    diff "$work/before" "$work/after"
}
check "dpkg --purge removes every file it installed or made" purged
check "dpkg --purge removes the user and group marengo" \
    expect_failure inside sh -c 'getent passwd marengo || getent group marengo || grep -w marengo /etc/group'
check "dpkg --purge leaves no unit behind" \
    expect_failure inside sh -c 'systemctl list-unit-files --no-legend "marengod*" | grep . || ls /etc/systemd/system/*/marengod* 2>/dev/null'

finished
