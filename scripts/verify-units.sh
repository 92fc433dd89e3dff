#!/usr/bin/env bash
# Checks lb's systemd units with `systemd-analyze verify` and fails on any
# diagnostic, including the warnings systemd-analyze itself exits 0 on
# (unknown keys, unparsable values: systemd ignores those lines at runtime,
# silently weakening the unit).
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/verify-units.sh [UNIT_FILE...]
       scripts/verify-units.sh --self-test

Verifies the given unit files (default: systemd/lb.service systemd/lb.socket)
inside a scratch root that holds the host's stock units and a stub
/usr/local/bin/lb, so ExecStart= and dependencies resolve without a build and
without touching the live system. Any output from systemd-analyze is a failure.

--self-test  verifies deliberately broken copies of the units and fails
             unless every one of them is rejected (and the real ones pass).

Installs systemd with apt-get if systemd-analyze is missing.
USAGE
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Every scratch directory comes from make_scratch and is removed at exit.
# Cleanup only ever deletes paths recorded here, and only if they still look
# like our mktemp names, so no variable mix-up can point rm at the host.
scratch_dirs=()
make_scratch() {
    local new
    new=$(mktemp -d "${TMPDIR:-/tmp}/lb-verify-units.XXXXXXXX")
    scratch_dirs+=("$new")
    scratch=$new
}
cleanup() {
    local d
    for d in "${scratch_dirs[@]}"; do
        case "$d" in
            */lb-verify-units.????????) rm -rf -- "$d" ;;
            *) echo "verify-units.sh: not removing unexpected path $d" >&2 ;;
        esac
    done
}
trap cleanup EXIT

ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null 2>&1 && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "verify-units.sh: systemd-analyze not found and apt-get unavailable; install systemd" >&2
        exit 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "verify-units.sh: systemd-analyze not found; run as root to install systemd" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    echo "installing systemd (for systemd-analyze)" >&2
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd
    command -v systemd-analyze >/dev/null 2>&1 || {
        echo "verify-units.sh: systemd-analyze still missing after installing systemd" >&2
        exit 1
    }
}

# verify UNIT_FILE... : prints diagnostics; returns non-zero if there were any.
verify() {
    local scratch root rc=0 out unit name dir real
    local names=()
    make_scratch
    root=$scratch
    # Stock units (sysinit.target, sockets.target, ...) must exist in the
    # root: every unit implicitly depends on them and verify checks that.
    # Copies rather than symlinks, since --root resolves absolute links
    # inside the root.
    for dir in /usr/lib/systemd/system /lib/systemd/system; do
        [ -d "$dir" ] || continue
        real=$(readlink -f "$dir")
        [ -e "$root$real" ] && continue
        mkdir -p "$root$real"
        cp -a "$real/." "$root$real/"
    done
    mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin"
    for unit in "$@"; do
        if [ ! -f "$unit" ]; then
            echo "verify-units.sh: no such unit file: $unit" >&2
            return 1
        fi
        name=$(basename "$unit")
        cp "$unit" "$root/etc/systemd/system/$name"
        names+=("$name")
    done
    # Only the path install.sh installs to is stubbed, so a typo in
    # ExecStart= is still reported.
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/lb"
    chmod 0755 "$root/usr/local/bin/lb"

    out=$(systemd-analyze verify --man=no --root="$root" "${names[@]}" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        printf '%s\n' "$out"
        echo "FAIL: systemd-analyze verify (exit $rc) on: $*" >&2
        return 1
    fi
    echo "OK: $*"
}

self_test() {
    local scratch cases_dir failed=0 broken
    make_scratch
    cases_dir=$scratch
    verify "$repo/systemd/lb.service" "$repo/systemd/lb.socket" || failed=1

    # Each case: the unit to break, then a sed expression that breaks it.
    local cases=(
        "lb.service" 's/^Type=notify$/Tpye=notify/'
        "lb.service" 's/^Restart=on-failure$/Restart=sometimes/'
        "lb.service" 's/^TimeoutStopSec=.*/TimeoutStopSec=forty-five/'
        "lb.service" 's/^SystemCallFilter=@system-service$/SystemCallFilter=@no-such-group/'
        "lb.service" 's|^ExecStart=/usr/local/bin/lb |ExecStart=/usr/local/bin/lbx |'
        "lb.service" 's/^\[Service\]$/[Servic]/'
        "lb.socket" 's/^Backlog=.*/Backlog=lots/'
        "lb.socket" 's/^Service=lb.service$/Service=nope.service/'
    )
    local i unit expr
    for ((i = 0; i < ${#cases[@]}; i += 2)); do
        unit=${cases[i]} expr=${cases[i + 1]}
        mkdir -p "$cases_dir/$i"
        cp "$repo/systemd/lb.service" "$repo/systemd/lb.socket" "$cases_dir/$i/"
        broken=$cases_dir/$i/$unit
        sed -i "$expr" "$broken"
        if cmp -s "$broken" "$repo/systemd/$unit"; then
            echo "SELF-TEST BROKEN: '$expr' did not change $unit" >&2
            failed=1
            continue
        fi
        if verify "$cases_dir/$i/lb.service" "$cases_dir/$i/lb.socket" >/dev/null 2>&1; then
            echo "SELF-TEST FAIL: $unit with '$expr' passed verification" >&2
            failed=1
        else
            echo "rejected as expected: $unit with '$expr'"
        fi
    done
    if [ "$failed" -ne 0 ]; then
        echo "self-test FAILED" >&2
        return 1
    fi
    echo "self-test passed"
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --self-test)
        [ $# -eq 1 ] || { echo "verify-units.sh: --self-test takes no arguments" >&2; exit 2; }
        ensure_systemd_analyze
        self_test ;;
    -*) echo "verify-units.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
    *)
        ensure_systemd_analyze
        if [ $# -eq 0 ]; then
            set -- "$repo/systemd/lb.service" "$repo/systemd/lb.socket"
        fi
        verify "$@" ;;
esac
