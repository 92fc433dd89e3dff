# shellcheck shell=bash
# Variables such as BE_ADDR and LB_LOG are set for the scripts that source this.
# shellcheck disable=SC2034
#
# Shell helpers shared by test_script.sh, scripts/demo.sh and
# scripts/load-test.sh: start `be` backends and lb on free loopback ports,
# wait for them with deadlines, and stop every process they started by PID.
#
# Source it after setting LB_WORK to a private scratch directory. Needs only
# bash, coreutils, grep and sed. Every process started here is recorded in
# $LB_WORK/pids as "PID STARTTIME"; the start time (from /proc) guards
# against signalling an unrelated process that reused a PID.

: "${LB_WORK:?LB_WORK must name a scratch directory before sourcing common.sh}"
LB_REPO=${LB_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
LB_BIN_DIR=${LB_BIN_DIR:-${CARGO_TARGET_DIR:-$LB_REPO/target}/release}
LB=${LB:-$LB_BIN_DIR/lb}
BE=${BE:-$LB_BIN_DIR/be}
LB_PIDS_FILE=$LB_WORK/pids

# curl sends even http://127.0.0.1 URLs through $http_proxy or $all_proxy,
# which fails every request and sends the traffic off the machine. Exempt
# loopback only: cargo may still need the proxy to fetch crates. curl reads
# no_proxy before NO_PROXY, so both carry the operator's entries.
no_proxy=${no_proxy:-${NO_PROXY:-}}
no_proxy=${no_proxy:+$no_proxy,}127.0.0.1,localhost,::1
NO_PROXY=$no_proxy
export no_proxy NO_PROXY

# now_us: microseconds since the epoch, without forking.
now_us() {
    local t=${EPOCHREALTIME//[.,]/}
    NOW_US=$t
}

# deadline VAR SECONDS: sets VAR to the time SECONDS from now, in
# microseconds (fractions allowed, e.g. 0.5). Each caller names its own
# variable so nested waits do not overwrite each other's deadlines.
deadline() {
    local whole=${2%.*} frac=0
    [[ $2 == *.* ]] && frac=${2#*.}
    frac=${frac}000000
    frac=${frac:0:6}
    now_us
    printf -v "$1" '%s' "$((NOW_US + 10#${whole:-0} * 1000000 + 10#$frac))"
}

# before DEADLINE: true while that deadline (from `deadline`) has not passed.
before() {
    now_us
    [ "$NOW_US" -lt "$1" ]
}

# proc_start PID: sets PROC_START to the process start time (clock ticks
# after boot); fails if there is no such process. Forks nothing, so
# scanning many processes stays cheap.
proc_start() {
    local stat rest
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    # Field 22 of stat is the 20th after "(comm) ".
    PROC_START=${20}
}

# track PID: records a process for stop_tracked.
track() {
    proc_start "$1" || return 0
    printf '%s %s\n' "$1" "$PROC_START" >>"$LB_PIDS_FILE"
}

# ours PID STARTTIME: true if PID is still the process we recorded.
ours() {
    proc_start "$1" || return 1
    [ "$PROC_START" = "$2" ]
}

# running PID STARTTIME: ours and not yet exited (a zombie has exited).
running() {
    local state
    ours "$1" "$2" || return 1
    { read -r state <"/proc/$1/stat"; } 2>/dev/null || return 1
    # The state follows "(comm) "; comm itself may contain spaces.
    state=${state##*) }
    [ "${state%% *}" != Z ]
}

# recorded_start PID: prints the start time recorded for PID by track.
recorded_start() {
    local p st found=""
    [ -f "$LB_PIDS_FILE" ] || return 1
    while read -r p st; do
        [ "$p" = "$1" ] && found=$st
    done <"$LB_PIDS_FILE"
    [ -n "$found" ] && printf '%s\n' "$found"
}

# stop_pid PID [GRACE_SECONDS]: SIGTERM, then SIGKILL after the grace period
# (default 3). Only signals PID if it is still the process track recorded.
stop_pid() {
    local pid=$1 grace=${2:-3} st until
    st=$(recorded_start "$pid") || return 0
    ours "$pid" "$st" || return 0
    kill -TERM "$pid" 2>/dev/null
    deadline until "$grace"
    while running "$pid" "$st" && before "$until"; do
        sleep 0.05
    done
    running "$pid" "$st" && kill -KILL "$pid" 2>/dev/null
    # Reaps it when it is this shell's child; harmless otherwise.
    { wait "$pid"; } 2>/dev/null
    return 0
}

# stop_tracked [GRACE_SECONDS]: stops every recorded process that is still
# running: SIGTERM to all, then SIGKILL to whatever outlives the grace period.
stop_tracked() {
    local grace=${1:-2} p st alive until
    [ -s "$LB_PIDS_FILE" ] || return 0
    while read -r p st; do
        ours "$p" "$st" && kill -TERM "$p" 2>/dev/null
    done <"$LB_PIDS_FILE"
    deadline until "$grace"
    while before "$until"; do
        alive=0
        while read -r p st; do
            if running "$p" "$st"; then
                alive=1
                break
            fi
        done <"$LB_PIDS_FILE"
        [ "$alive" -eq 0 ] && break
        sleep 0.05
    done
    while read -r p st; do
        running "$p" "$st" && kill -KILL "$p" 2>/dev/null
        { wait "$p"; } 2>/dev/null
    done <"$LB_PIDS_FILE"
    : >"$LB_PIDS_FILE"
}

# wait_for_line FILE REGEX PID SECONDS: waits until FILE has a line matching
# REGEX (grep -E). Fails early if PID exits, or when the deadline passes.
wait_for_line() {
    local file=$1 re=$2 pid=$3 until
    deadline until "$4"
    while before "$until"; do
        grep -Eq -- "$re" "$file" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            # One last look: it may have printed the line and then exited.
            grep -Eq -- "$re" "$file" 2>/dev/null
            return
        fi
        sleep 0.05
    done
    return 1
}

# last_line FILE: the last non-empty line, for error messages.
last_line() {
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1
}

# start_be NAME PORT [be flags...]: starts `be -c NAME` on 127.0.0.1:PORT
# (0 = any free port) and waits for its "listening on" line.
# Sets BE_PID, BE_ADDR (127.0.0.1:PORT) and BE_LOG; returns 1 with ERR set.
start_be() {
    local name=$1 port=$2
    shift 2
    BE_LOG=$(mktemp "$LB_WORK/be.XXXXXX")
    "$BE" -p "$port" -c "$name" "$@" >"$BE_LOG" 2>&1 &
    BE_PID=$!
    track "$BE_PID"
    if ! wait_for_line "$BE_LOG" '^listening on ' "$BE_PID" 10; then
        ERR="be '$name' did not start: $(last_line "$BE_LOG")"
        stop_pid "$BE_PID" 1
        return 1
    fi
    BE_ADDR=$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$BE_LOG" | head -n 1)
}

# start_lb [lb flags...]: starts lb on 127.0.0.1 (unless the flags name
# --bind) and port 0 (unless they name -p/--port) with stdout in LB_OUT and
# stderr (its log) in LB_LOG, and waits for its "listening on ADDR" line.
# Sets LB_PID, LB_ADDR, LB_LOG and LB_OUT; returns 1 with ERR set (lb's last
# log line) if it does not start.
start_lb() {
    local a port=(-p 0) bind=(--bind 127.0.0.1)
    for a in "$@"; do
        case $a in
            -p | --port | --port=*) port=() ;;
            # A fixed port still listens on loopback only: lb's default
            # address is every interface.
            --bind | --bind=*) bind=() ;;
        esac
    done
    LB_LOG=$(mktemp "$LB_WORK/lb.XXXXXX")
    LB_OUT=$LB_LOG.out
    "$LB" "${port[@]}" "${bind[@]}" "$@" >"$LB_OUT" 2>"$LB_LOG" &
    LB_PID=$!
    track "$LB_PID"
    wait_lb_listening "$LB_PID" "$LB_LOG"
}

# wait_lb_listening PID LOG: waits for lb's "listening on ADDR" log line and
# sets LB_ADDR from it.
wait_lb_listening() {
    if ! wait_for_line "$2" 'listening on [^ ]+' "$1" 10; then
        ERR="lb did not start: $(last_line "$2")"
        [ -n "$ERR" ] || ERR="lb did not start (no output)"
        stop_pid "$1" 1
        return 1
    fi
    # lb's own line is "listening on ADDR with N workers; ...": prefer it over
    # other components (an admin endpoint) that may also say "listening on".
    LB_ADDR=$(grep -Eo 'listening on [^ ]+ with' "$2" | head -n 1 | sed 's/^listening on //; s/ with$//')
    if [ -z "$LB_ADDR" ]; then
        LB_ADDR=$(grep -Eo 'listening on [^ ]+' "$2" | head -n 1 | sed 's/^listening on //; s/[,;]$//')
    fi
    [ -n "$LB_ADDR" ] || { ERR="cannot find lb's address in its log"; return 1; }
}

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    local port tries=0
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null) && [ -n "$port" ]; then
        printf '%s\n' "$port"
        return 0
    fi
    while [ $tries -lt 50 ]; do
        tries=$((tries + 1))
        port=$((20000 + RANDOM % 40000))
        # A refused connect means no listener; nothing else is checked.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# port_is_listening PORT: true if something accepts connections on it.
port_is_listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# lb_stats_block PID OUT: sends lb SIGUSR1 and waits (up to 3 s) for the
# stats block it prints on stdout (the file OUT); sets STATS_BLOCK to it,
# empty if none appeared.
lb_stats_block() {
    local lines until
    lines=$(wc -l <"$2")
    kill -USR1 "$1"
    deadline until 3
    STATS_BLOCK=""
    while before "$until"; do
        STATS_BLOCK=$(tail -n +"$((lines + 1))" "$2" |
            awk '/^=== Load Balancer Stats ===$/ { b = $0 "\n"; on = 1; next }
                 on && /^=+$/ { print b $0; exit }
                 on { b = b $0 "\n" }')
        [ -n "$STATS_BLOCK" ] && break
        sleep 0.05
    done
}
