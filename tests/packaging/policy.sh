#!/usr/bin/env bash
# The packaged system bus policy (packaging/dbus/org.marengo.Llm1.conf), loaded unchanged
# into a private dbus-daemon that otherwise has Debian's system bus defaults: only the user
# marengo may own org.marengo.Llm1; root and members of the group marengo get answers from a
# real marengod; any other user is refused by the bus. The users are real, made here with
# useradd and removed afterwards; clients run as them through setpriv.
# Usage: tests/packaging/policy.sh   (as root)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

marengod="${MARENGOD:-$repo/target/release/marengod}"
caller=marengo-test-caller
stranger=marengo-test-stranger
bus_name=org.marengo.Llm1

work="$(mktemp -d)"
# The daemon and the clients run as other users: they need to reach the socket and the bundle.
chmod 755 "$work"
created_users=()
bus_pid=""
daemon_pid=""

cleanup() {
    [[ -z "$daemon_pid" ]] || kill "$daemon_pid" 2>/dev/null || true
    [[ -z "$bus_pid" ]] || kill "$bus_pid" 2>/dev/null || true
    local u
    for u in "${created_users[@]}"; do
        userdel "$u" 2>/dev/null || true
    done
    # userdel leaves the group marengo when other members were in it at the time.
    if [[ " ${created_users[*]} " == *" marengo "* ]] && getent group marengo >/dev/null; then
        groupdel marengo 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# ensure_user NAME [useradd options]: makes a system user unless it exists.
ensure_user() {
    local user="$1"
    shift
    if ! getent passwd "$user" >/dev/null; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$@" "$user"
        created_users=("$user" "${created_users[@]}")
    fi
}
ensure_user marengo --user-group
ensure_user "$caller" --groups marengo
ensure_user "$stranger"

# as USER CMD...: runs CMD with USER's uid, gid and supplementary groups.
as() {
    local user="$1"
    shift
    setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups -- "$@"
}

# Debian's system.conf, made private: no <user>, <fork>, service helper, syslog, pid file or
# standard service directories, its own socket, and the project's policy as its only system.d.
mkdir "$work/system.d"
cp "$repo/packaging/dbus/org.marengo.Llm1.conf" "$work/system.d/"
sed -e '/<user>/d' -e '/<fork\/>/d' -e '/<servicehelper>/d' -e '/<syslog\/>/d' \
    -e '/<pidfile>/d' -e '/<standard_system_servicedirs\/>/d' \
    -e "s|<listen>.*</listen>|<listen>unix:path=$work/system_bus_socket</listen>|" \
    -e "s|<includedir>system.d</includedir>|<includedir>$work/system.d</includedir>|" \
    -e '/<includedir>\/etc\/dbus-1\/system.d<\/includedir>/d' \
    -e '/<include ignore_missing="yes">\/etc\/dbus-1\//d' \
    /usr/share/dbus-1/system.conf > "$work/system.conf"
grep -q "<includedir>$work/system.d</includedir>" "$work/system.conf"

dbus-daemon --config-file="$work/system.conf" --fork --print-address=3 --print-pid=4 \
    3>"$work/address" 4>"$work/pid"
bus_pid="$(cat "$work/pid")"
address="$(head -n 1 "$work/address")"
export DBUS_SYSTEM_BUS_ADDRESS="$address"

bus_call() {
    busctl --address="$address" call org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus "$@"
}

check "user marengo may own $bus_name" contains "u 1" as marengo \
    busctl --address="$address" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus RequestName su "$bus_name" 0
check "another user may not own $bus_name" fails_with "Access denied" as "$stranger" \
    busctl --address="$address" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus RequestName su "$bus_name" 0
check "group marengo alone does not let a caller own $bus_name" fails_with "Access denied" \
    as "$caller" busctl --address="$address" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus RequestName su "$bus_name" 0

"$repo/tests/packaging/tiny-bundle.sh" "$work/bundle" >/dev/null
chmod -R a+rX "$work/bundle"
# Not through `as`: a backgrounded function is a subshell, and $! would be its pid, not the
# daemon's (setpriv execs marengod, so here $! is marengod).
setpriv --reuid=marengo --regid="$(id -g marengo)" --init-groups -- \
    "$marengod" serve --address "$address" --bundle "$work/bundle" 2>"$work/daemon.log" &
daemon_pid=$!

name_owned() {
    local i
    for i in $(seq 1 300); do
        if bus_call NameHasOwner s "$bus_name" 2>/dev/null | grep -q true; then
            return 0
        fi
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.log"; return 1; }
        sleep 0.1
    done
    echo "marengod did not own $bus_name within 30 s"
    cat "$work/daemon.log"
    return 1
}
check "marengod, run as marengo, owns $bus_name" name_owned

complete_as() {
    local user="$1"
    as "$user" busctl --address="$address" call "$bus_name" /org/marengo/Llm1 org.marengo.Llm1 \
        Complete 'sa{sv}' "Hello" 1 max_tokens u 3
}
check "root gets an answer" contains 'sa{sv} "' complete_as root
check "a member of the group marengo gets an answer" contains 'sa{sv} "' complete_as "$caller"
check "another user is refused by the bus" fails_with "Access denied" \
    complete_as "$stranger"
check "another user cannot read properties either" fails_with "Access denied" \
    as "$stranger" busctl --address="$address" get-property "$bus_name" /org/marengo/Llm1 \
    org.marengo.Llm1 Version

finished
