#!/usr/bin/env bash
# The one-command demo: builds lb and be, starts two `be` backends with lb in
# front of them on free loopback ports, sends requests with curl showing
# which backend answered each, kills one backend to show failover, prints
# lb's stats, and stops everything. Needs only the Rust toolchain and curl.
set -uo pipefail
export LC_ALL=C

usage() {
    cat <<'USAGE'
Usage: scripts/demo.sh [--requests N] [--keep-running]

  --requests N     requests before and after the failover (default 10)
  --keep-running   after the demo, leave lb and the surviving backend up
                   until Ctrl-C, so you can try curl yourself
  -h, --help       show this help

Exits non-zero if any request fails or goes to the wrong backend, so it
doubles as a smoke test.
USAGE
}

requests=10
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --requests)
            [ $# -ge 2 ] && [[ $2 =~ ^[1-9][0-9]{0,3}$ ]] ||
                { echo "demo.sh: --requests needs a number from 1 to 9999" >&2; exit 2; }
            requests=$2
            shift 2 ;;
        --keep-running) keep=1; shift ;;
        *) echo "demo.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for tool in cargo curl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "demo.sh: $tool is required" >&2; exit 2; }
done

LB_WORK=$(mktemp -d "${TMPDIR:-/tmp}/lb-demo.XXXXXXXX") || exit 2
export LB_WORK
# shellcheck source=scripts/common.sh
. "$repo/scripts/common.sh"

cleanup() {
    stop_tracked 3
    case $LB_WORK in */lb-demo.????????) rm -rf -- "$LB_WORK" ;; esac
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping lb and the backends"; exit 130' INT TERM HUP

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "demo.sh: $*" >&2
    exit 1
}

# send FIRST LAST: requests FIRST..LAST, one connection each; prints who
# answered and tallies into ANSWERED_<letter> and ERRORS.
send() {
    local i out code body
    for ((i = $1; i <= $2; i++)); do
        out=$(curl -s --max-time 5 -H 'Connection: close' -w '\n%{http_code}' "http://$LB_ADDR/")
        code=${out##*$'\n'}
        body=${out%$'\n'*}
        body=${body%$'\n'}
        if [ "$code" = 200 ]; then
            printf '    request %2d: %s  %s\n' "$i" "$code" "$body"
            case $body in
                "Server A") ANSWERED_A=$((ANSWERED_A + 1)) ;;
                "Server B") ANSWERED_B=$((ANSWERED_B + 1)) ;;
                *) ERRORS=$((ERRORS + 1)) ;;
            esac
        else
            printf '    request %2d: FAILED (status %s)\n' "$i" "$code"
            ERRORS=$((ERRORS + 1))
        fi
    done
}

step "Building lb and be (cargo build --release)"
(cd "$repo" && cargo build --release --bins) || die "cargo build failed"

step "Starting two backends"
start_be "Server A" 0 || die "$ERR"
a=$BE_ADDR a_pid=$BE_PID
echo "    Server A  on $a  (pid $a_pid):  be -p 0 -c \"Server A\""
start_be "Server B" 0 || die "$ERR"
b=$BE_ADDR b_pid=$BE_PID
echo "    Server B  on $b  (pid $b_pid):  be -p 0 -c \"Server B\""

step "Starting lb in front of them"
start_lb -b "$a" "$b" || die "$ERR"
echo "    lb        on $LB_ADDR  (pid $LB_PID):  lb -p 0 --bind 127.0.0.1 -b $a $b"

step "$requests requests, each on a new connection: curl http://$LB_ADDR/"
ANSWERED_A=0 ANSWERED_B=0 ERRORS=0
send 1 "$requests"
echo "    -> Server A answered $ANSWERED_A, Server B answered $ANSWERED_B, $ERRORS failed"
[ "$ERRORS" -eq 0 ] || die "requests failed with both backends up"

step "Killing Server B (kill -9 $b_pid) to show failover"
# Kill and reap in one redirected group, or bash reports "Killed" on stderr.
{ kill -KILL "$b_pid" && wait "$b_pid"; } 2>/dev/null
echo "    Server B is gone; lb retries a refused connect on the next backend,"
echo "    so clients see no error"

step "$requests more requests"
ANSWERED_A=0 ANSWERED_B=0 ERRORS=0
send $((requests + 1)) $((requests * 2))
echo "    -> Server A answered $ANSWERED_A, Server B answered $ANSWERED_B, $ERRORS failed"
[ "$ERRORS" -eq 0 ] && [ "$ANSWERED_B" -eq 0 ] || die "failover did not hide the dead backend"

step "lb's stats (kill -USR1 $LB_PID prints them on lb's stdout)"
lb_stats_block "$LB_PID" "$LB_OUT"
if [ -n "$STATS_BLOCK" ]; then
    printf '%s\n' "$STATS_BLOCK" | sed 's/^/    /'
else
    echo "    (no stats block appeared on lb's stdout within 3 s)"
fi
echo
echo "    lb's log (stderr):"
sed 's/^/    /' "$LB_LOG"

if [ "$keep" = 1 ]; then
    step "lb is still up on http://$LB_ADDR/ with Server A behind it; press Ctrl-C to stop"
    while kill -0 "$LB_PID" 2>/dev/null; do sleep 1; done
    die "lb exited"
fi

step "Stopping lb (SIGTERM: stop accepting, drain, exit) and the backends"
kill -TERM "$LB_PID"
lb_start=$(recorded_start "$LB_PID")
deadline until 10
while running "$LB_PID" "$lb_start" && before "$until"; do
    sleep 0.05
done
wait "$LB_PID"
rc=$?
echo "    lb exited with status $rc"
stop_tracked 3
[ "$rc" -eq 0 ] || die "lb exited with status $rc"
echo
echo "Done. Next: ./test_script.sh runs the operator test suite; scripts/load-test.sh runs k6."
