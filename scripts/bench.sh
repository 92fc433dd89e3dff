#!/usr/bin/env bash
# bench.sh - side-by-side comparison of lb against HAProxy and nginx stream.
#
# Everything runs on 127.0.0.1. Two nginx HTTP backends ("Server A\n",
# "Server B\n") and one iperf3 server are started once; then each row (a
# proxy configuration, or "direct" = no proxy) is started on its own, measured
# and stopped again, round-robin over the rows (A B C A B C) so that drift hits
# every row alike. The rows: direct; lb (its defaults: --splice auto) and, when it has
# --splice, lb with --splice never and always; HAProxy (mode tcp, leastconn)
# without splice, with splice-auto and with forced splice; nginx stream
# (least_conn). Per row and round it measures:
#   ka    HTTP keep-alive req/s, latency p50/p99      (wrk -t2 -c64 --latency)
#   cc    one TCP connection per request, req/s      (wrk -H 'Connection: close')
#   fwd   bulk Gbit/s client->server                 (iperf3 -J)
#   rev   bulk Gbit/s server->client                 (iperf3 -J -R)
#   hold  proxy RSS idle and holding 5,000 idle client connections
#   cpu   proxy user+system CPU per request / per GB (/proc/PID/stat)
#   kernel  per request / per GB: the machine's idle share and busy CPU, TCP
#         segments sent on loopback, context switches of the proxy and of
#         the whole machine (/proc); with
#         --counts also the proxy's syscalls, epoll waits and splices (perf)
# and writes bench-results/results.md (medians, ratios, the targets of issues 5 and 6),
# bench-results/chart.png and bench-results/raw-<timestamp>.tsv (every sample).
#
# Run scripts/bench.sh --help for the options.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
HELPERS=$SCRIPT_DIR/bench
OUT_DIR=$REPO_ROOT/bench-results

# ---------------------------------------------------------------------------
# Row table: name | kind | extra configuration.
#   kind direct:  no proxy, load goes straight to the backend (extra unused)
#   kind lb:      extra = additional lb command-line arguments; a row whose
#                 flags the lb binary does not list in --help is left out of
#                 the default set (and is an error when asked for by --rows)
#   kind haproxy: extra = directives for the listen section, ';'-separated
#   kind nginx:   extra = directives for the stream server block, ';'-separated
# Add a row with one line, e.g. "lb-no-retry|lb|--retries 0".
# ---------------------------------------------------------------------------
ROW_TABLE=(
    "direct|direct|"
    # lb's defaults, which include --splice auto (so there is no
    # separate lb-splice-auto row: it would measure the same thing twice).
    "lb|lb|"
    # lb with the kernel relay, which its defaults leave off: pairs that
    # trade small messages move into the kernel (when lb may load it).
    # Opt-in (OPT_IN_ROWS).
    "lb-kernel-relay|lb|--kernel-relay auto"
    "lb-splice-never|lb|--splice never"
    "lb-splice-always|lb|--splice always"
    "haproxy-nosplice|haproxy|"
    "haproxy-splice-auto|haproxy|option splice-auto"
    "haproxy-splice-forced|haproxy|option splice-request;option splice-response"
    "nginx|nginx|"
)

# Shared settings: identical for every proxy.
WORKERS=$(nproc)          # lb --workers, haproxy nbthread, nginx worker_processes
BUFSIZE=32768             # lb --buffer-size (which also sizes its pipes), haproxy tune.bufsize and
                          # tune.pipesize, nginx proxy_buffer_size. HAProxy's pipes would otherwise
                          # stay at the kernel's 64 KiB and need half the splice calls per byte.
CONNECT_TIMEOUT=5         # seconds: lb --connection-timeout, haproxy timeout connect, nginx proxy_connect_timeout
IDLE_TIMEOUT=300          # seconds: lb --idle-timeout, haproxy timeout client/server, nginx proxy_timeout
MAXCONN=20000             # lb --max-connections, haproxy maxconn, nginx worker_connections (lowered if ulimit -n is small)
BACKLOG=4096              # listen backlog for haproxy/nginx frontends and the backends
WRK_THREADS=2
WRK_CONNS=64
HOLD_CONNS=5000

# Time budget: when --duration is not given, the wrk/iperf3 durations are
# shortened (from DURATION_MAX) until the estimated run fits the budget.
BUDGET_FULL=660           # seconds (the full run must end within 12 minutes)
BUDGET_QUICK=165          # seconds (--quick must end within 3 minutes)
FIXED_OVERHEAD=10         # seconds: busy check, backends, warm-up, report
ROW_OVERHEAD=5            # seconds per row and round: starts, stops, holding connections

# Defaults, changed by options.
# Five short rounds rather than three long ones: a row's throughput barely
# moves within one start of its proxy (about 2 % between back-to-back wrk
# runs) but moves up to 30 % from one start to the next (where the scheduler
# happens to place the threads), so more starts steady the medians more
# than longer measurements do.
ROUNDS=5
DURATION_MAX=7            # seconds per wrk measurement
DURATION=""               # chosen by fit_durations unless --duration is given
BULK_DURATION=""          # seconds per iperf3 direction; default max(2, DURATION/2)
ROWS_ARG=""
# Rows that run only when --rows names them: an opt-in feature's row would
# otherwise shorten every measurement of a full run to fit its budget.
OPT_IN_ROWS=(lb-kernel-relay)
LB_BIN=$REPO_ROOT/target/release/lb
LB_BIN_DEFAULT=1
LB_CMP_BIN=""             # --compare: a second lb binary, run as row lb-compare
KEEP_TMP=0
QUICK=0
COUNTS=0                  # --counts: count the proxy's syscalls with perf
OWN_SESSIONS=0            # --own-sessions: each server in a session of its own
PERF_EVENTS=""            # the tracepoints --counts found usable

usage() {
    cat <<EOF
usage: scripts/bench.sh [options]

Side-by-side benchmark of lb, HAProxy (3 splice variants) and nginx stream on
127.0.0.1. Installs missing tools with apt-get (haproxy, nginx,
libnginx-mod-stream, wrk, iperf3, gnuplot-nox, python3).

options:
  --quick          1 round, wrk runs of at most 3 s (fits in 3 min)
  --rounds N       rounds over all rows, medians reported (default 5)
  --duration S     seconds per wrk measurement; iperf3 gets max(2, S/2) per
                   direction (default: 7, shortened when needed so that the
                   run ends within 12 min, or 3 min with --quick)
  --rows a,b,c     subset of rows, in that order (default: all rows whose
                   lb flags the lb binary supports, but the opt-in ones)
  --lb PATH        lb binary (default target/release/lb, built with
                   'cargo build --release' if missing)
  --compare PATH   A/B of two lb builds: adds row lb-compare, running the lb
                   binary at PATH with the same flags as row lb; without
                   --rows only lb and lb-compare run. Writes
                   bench-results/compare-<timestamp>.md and .png, not
                   results.md; the lb/lb-compare ratios judge the change
                   (with --counts: the .md alone, its counts side by side)
  --counts         also count each proxy's syscalls, epoll waits and splices
                   with perf (installs linux-perf; needs root or tracepoint
                   access). Counting slows every syscall on the machine a
                   little, and each proxy by the syscalls it makes, so such
                   a run writes bench-results/counts.md instead of
                   results.md
  --own-sessions   start each server (backends, proxy, iperf3 server), and
                   the idle-connection holder, in a session of its own
                   (setsid), as daemons and services run; wrk and the
                   iperf3 client stay in the benchmark's. With the
                   kernel's scheduler autogroups on (the usual default),
                   a session is a CPU scheduling group: by default
                   everything shares the benchmark's, so the proxy competes
                   thread by thread with the load generator and the
                   backends, and all of them as one group with the kernel
                   threads that lb's kernel relay sends through. Writes
                   results-own-sessions.md and chart-own-sessions.png
                   (with --counts counts-own-sessions.md), never the
                   published files
  --shared-session the default, stated explicitly: every server in the
                   benchmark's session
  --keep-tmp       keep the temp dir with configs and logs
  -h, --help       this help

rows: $(row_names | tr '\n' ' ')
  (lb-splice-* need an lb with --splice; without it they are skipped;
  ${OPT_IN_ROWS[*]} only when --rows names it)

Outputs: bench-results/results.md, bench-results/chart.png,
         bench-results/raw-<timestamp>.tsv (every sample; not committed);
         with --counts bench-results/counts.md instead, and no chart;
         with --own-sessions results-own-sessions.md and
         chart-own-sessions.png (counts-own-sessions.md) instead
EOF
}

log() { printf '[bench %4ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'bench.sh: error: %s\n' "$*" >&2; exit 1; }

row_names() { local r; for r in "${ROW_TABLE[@]}"; do echo "${r%%|*}"; done; }

# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------
parse_args() {
    while (($#)); do
        case $1 in
            --quick) QUICK=1 ;;
            --rounds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--rounds needs a positive integer"; ROUNDS=$2; shift ;;
            --duration) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--duration needs a positive number of seconds"; DURATION=$2; shift ;;
            --rows) [[ -n ${2:-} ]] || die "--rows needs a comma-separated list"; ROWS_ARG=$2; shift ;;
            --lb) [[ -n ${2:-} ]] || die "--lb needs a path"; LB_BIN=$2; LB_BIN_DEFAULT=0; shift ;;
            --compare) [[ -n ${2:-} ]] || die "--compare needs a path"; LB_CMP_BIN=$2; shift ;;
            --counts) COUNTS=1 ;;
            --keep-tmp) KEEP_TMP=1 ;;
            --own-sessions) OWN_SESSIONS=1 ;;
            --shared-session) OWN_SESSIONS=0 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $1" ;;
        esac
        shift
    done
    if ((QUICK)); then
        ROUNDS=1
        DURATION_MAX=3
    fi

    declare -gA ROW_KIND=() ROW_EXTRA=()
    local r name rest
    for r in "${ROW_TABLE[@]}"; do
        name=${r%%|*}; rest=${r#*|}
        ROW_KIND[$name]=${rest%%|*}
        ROW_EXTRA[$name]=${rest#*|}
    done
    if [[ -n $LB_CMP_BIN ]]; then
        ROW_KIND[lb-compare]=lbcmp
        ROW_EXTRA[lb-compare]=${ROW_EXTRA[lb]}
    fi
    if [[ -n $ROWS_ARG ]]; then
        IFS=, read -r -a ROWS <<<"$ROWS_ARG"
    elif [[ -n $LB_CMP_BIN ]]; then
        ROWS=(lb lb-compare)
    else
        mapfile -t ROWS < <(row_names | grep -vxF -f <(printf '%s\n' "${OPT_IN_ROWS[@]}"))
    fi
    for r in "${ROWS[@]}"; do
        [[ -n ${ROW_KIND[$r]+x} ]] || die "unknown row '$r' (rows: $(row_names | paste -sd, -)$([[ -n $LB_CMP_BIN ]] && echo ,lb-compare))"
    done
}

# ---------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------
NGINX_STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

nginx_stream_builtin() { nginx -V 2>&1 | grep -qE -- '--with-stream( |$)'; }

install_deps() {
    local need=()
    command -v python3 >/dev/null || need+=(python3)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v nginx >/dev/null || need+=(nginx)
    if ! command -v nginx >/dev/null || { ! nginx_stream_builtin && [[ ! -e $NGINX_STREAM_MODULE ]]; }; then
        need+=(libnginx-mod-stream)
    fi
    command -v wrk >/dev/null || need+=(wrk)
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v gnuplot >/dev/null || need+=(gnuplot-nox)
    ((COUNTS)) && ! command -v perf >/dev/null && need+=(linux-perf)
    ((${#need[@]})) || return 0

    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "missing ${need[*]}: run as root or install them: apt-get install ${need[*]}"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get (this script installs from Debian)"
    log "installing from Debian: ${need[*]}"
    "${sudo[@]}" apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed"
    if ! nginx_stream_builtin && [[ ! -e $NGINX_STREAM_MODULE ]]; then
        die "nginx has no stream module (looked for $NGINX_STREAM_MODULE)"
    fi
}

# check_perf: with --counts, the syscall tracepoints perf can count here.
# epoll_wait and epoll_pwait are both asked for: which one a proxy calls
# depends on its libc, and some architectures have only the second.
check_perf() {
    ((COUNTS)) || return 0
    local ev ok=()
    perf stat -x, -o /dev/null -e raw_syscalls:sys_enter -- true >/dev/null 2>&1 \
        || die "--counts: perf cannot count syscalls here (run as root, or lower kernel.perf_event_paranoid and make tracefs readable)"
    for ev in raw_syscalls:sys_enter syscalls:sys_enter_epoll_wait syscalls:sys_enter_epoll_pwait syscalls:sys_enter_splice; do
        perf stat -x, -o /dev/null -e "$ev" -- true >/dev/null 2>&1 && ok+=("$ev")
    done
    PERF_EVENTS=$(IFS=,; echo "${ok[*]}")
    # counts_start starts the counters through a control FIFO (perf 5.10+).
    local dir
    dir=$(mktemp -d)
    mkfifo "$dir/ctl" "$dir/ack"
    perf stat -x, -o /dev/null -D -1 --control "fifo:$dir/ctl,$dir/ack" -e raw_syscalls:sys_enter -- true >/dev/null 2>&1 \
        || { rm -rf "$dir"; die "--counts: this perf has no --control (perf 5.10 or newer is needed)"; }
    rm -rf "$dir"
}

ensure_lb() {
    local r need_lb=0
    for r in "${ROWS[@]}"; do [[ ${ROW_KIND[$r]} == lb* ]] && need_lb=1; done
    ((need_lb)) || return 0
    if [[ ! -x $LB_BIN ]]; then
        ((LB_BIN_DEFAULT)) || die "lb binary not found or not executable: $LB_BIN"
        command -v cargo >/dev/null || die "$LB_BIN is missing and cargo is not installed to build it"
        log "building lb: cargo build --release"
        (cd "$REPO_ROOT" && cargo build --release) || die "cargo build --release failed"
        [[ -x $LB_BIN ]] || die "cargo build --release did not produce $LB_BIN"
    fi
    LB_BIN=$(cd "$(dirname "$LB_BIN")" && pwd)/$(basename "$LB_BIN")
    if [[ -n $LB_CMP_BIN ]]; then
        [[ -x $LB_CMP_BIN ]] || die "--compare: lb binary not found or not executable: $LB_CMP_BIN"
        LB_CMP_BIN=$(cd "$(dirname "$LB_CMP_BIN")" && pwd)/$(basename "$LB_CMP_BIN")
        LB_HELP=$("$LB_CMP_BIN" --help 2>&1 || true)
        lb_optional_args
        LB_CMP_OPTIONAL_ARGS=("${LB_OPTIONAL_ARGS[@]}")
    fi
    LB_HELP=$("$LB_BIN" --help 2>&1 || true)
    lb_optional_args
    drop_unsupported_lb_rows
}

# lb_has_flag FLAG: whether lb --help lists FLAG (as a whole word).
lb_has_flag() { grep -qE -- "(^|[[:space:],])$1([[:space:]=,]|$)" <<<"$LB_HELP"; }

# drop_unsupported_lb_rows: lb rows use flags that newer lb builds add (e.g.
# --splice). Rows whose flags this binary lacks leave the default set with a
# note; asking for one with --rows is an error.
drop_unsupported_lb_rows() {
    local r w words kept=() missing
    for r in "${ROWS[@]}"; do
        missing=""
        if [[ ${ROW_KIND[$r]} == lb ]]; then
            read -r -a words <<<"${ROW_EXTRA[$r]}"
            for w in "${words[@]}"; do
                [[ $w == --* ]] || continue
                lb_has_flag "$w" || missing+=" $w"
            done
        fi
        if [[ -z $missing ]]; then
            kept+=("$r")
        elif [[ -n $ROWS_ARG ]]; then
            die "row $r needs lb$missing, which $LB_BIN does not support (see its --help)"
        else
            log "note: skipping row $r: $LB_BIN has no$missing"
        fi
    done
    ROWS=("${kept[@]}")
}

# fit_durations: unless --duration was given, the longest wrk duration up to
# DURATION_MAX whose estimated total stays within the budget.
estimate_seconds() {
    local d=$1 b=$(($1 / 2 < 2 ? 2 : $1 / 2)) perf=$((COUNTS ? 2 : 0))
    echo $((FIXED_OVERHEAD + ROUNDS * ${#ROWS[@]} * (2 * d + 2 * b + ROW_OVERHEAD + perf)))
}

fit_durations() {
    local budget=$BUDGET_FULL
    ((QUICK)) && budget=$BUDGET_QUICK
    if [[ -z $DURATION ]]; then
        DURATION=$DURATION_MAX
        while ((DURATION > 2)) && (($(estimate_seconds "$DURATION") > budget)); do
            DURATION=$((DURATION - 1))
        done
    fi
    BULK_DURATION=$((DURATION / 2 < 2 ? 2 : DURATION / 2))
    ESTIMATE=$(estimate_seconds "$DURATION")
    ((ESTIMATE <= budget)) || log "warning: estimated $((ESTIMATE / 60)) min $((ESTIMATE % 60)) s, over the $((budget / 60)) min budget"
}

raise_nofile() {
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    NOFILE=$(ulimit -n)
    # Each connection takes 2 fds (client + upstream), plus a pipe (2 fds) for
    # some of them when haproxy splices: keep MAXCONN below NOFILE/3.
    local cap=$(((NOFILE - 400) / 3))
    ((MAXCONN <= cap)) || MAXCONN=$cap
    ((MAXCONN > HOLD_CONNS)) || die "ulimit -n $NOFILE allows only $MAXCONN connections per proxy; need more than $HOLD_CONNS"
    # nginx counts both sides of a proxied connection (per worker).
    NGINX_WORKER_CONNS=$((2 * MAXCONN))
    ((NGINX_WORKER_CONNS <= NOFILE - 100)) || NGINX_WORKER_CONNS=$((NOFILE - 100))
}

# ---------------------------------------------------------------------------
# Process management: every server is started by spawn and recorded in LIVE;
# the EXIT trap kills whatever is still recorded, by PID.
# ---------------------------------------------------------------------------
declare -A LIVE=()
TMP=""

proc_alive() {
    local s
    s=$(sed -E 's/.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $s && $s != Z ]]
}

# proc_tree PID: sets TREE to PID and all its descendants (/proc/P/task/T/children).
proc_tree() {
    TREE=("$1")
    local i=0 t kids
    while ((i < ${#TREE[@]})); do
        for t in "/proc/${TREE[i]}"/task/*/children; do
            kids=()
            read -r -a kids 2>/dev/null <"$t" || true
            TREE+=("${kids[@]}")
        done
        i=$((i + 1))
    done
}

# proc_sample PID: resources of PID's process tree, without forking.
#   S_CPU  utime+stime in clock ticks (fields 14+15 of /proc/P/stat, which
#          already covers all threads), summed over the tree
#   S_RSS  VmRSS in KiB, summed over the tree
#   S_FDS  open file descriptors, summed over the tree
proc_sample() {
    local p line f k v fds
    S_CPU=0 S_RSS=0 S_FDS=0
    proc_tree "$1"
    for p in "${TREE[@]}"; do
        read -r line 2>/dev/null <"/proc/$p/stat" || continue
        read -r -a f <<<"${line##*) }" # f[0] is field 3: comm may hold spaces
        S_CPU=$((S_CPU + f[11] + f[12]))
        while read -r k v _; do
            if [[ $k == VmRSS: ]]; then S_RSS=$((S_RSS + v)); break; fi
        done 2>/dev/null <"/proc/$p/status" || true
        fds=("/proc/$p/fd/"*)
        [[ -e ${fds[0]} ]] && S_FDS=$((S_FDS + ${#fds[@]}))
    done
    return 0
}

# spawn NAME CMD... : run CMD in the background, output to $TMP/NAME.log; sets SPAWNED_PID.
spawn() {
    local name=$1; shift
    # Not a process group leader (no job control here), so setsid execs
    # in place: $! is the command's own PID.
    local own=()
    ((OWN_SESSIONS)) && own=(setsid)
    "${own[@]}" "$@" >"$TMP/$name.log" 2>&1 &
    SPAWNED_PID=$!
    LIVE[$SPAWNED_PID]=$name
}

# run_client OUT ERR CMD... : run a load generator to completion, output to
# OUT, errors to ERR. It runs in the background and is waited for so that an
# interrupt reaches the traps at once and cleanup stops it by PID.
run_client() {
    local out=$1 err=$2 pid rc=0
    shift 2
    "$@" >"$out" 2>"$err" &
    pid=$!
    LIVE[$pid]=client
    wait "$pid" || rc=$?
    unset "LIVE[$pid]"
    return "$rc"
}

# kill_tree PID: SIGTERM the process, SIGKILL it and its descendants if still there after 5 s.
kill_tree() {
    local pid=$1 pids i p left
    proc_tree "$pid"
    pids=("${TREE[@]}")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        left=0
        for p in "${pids[@]}"; do proc_alive "$p" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do proc_alive "$p" && kill -KILL "$p" 2>/dev/null; done
    wait "$pid" 2>/dev/null || true
    unset "LIVE[$pid]"
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${!LIVE[@]}"; do kill_tree "$pid"; done
    if [[ -n $TMP && -d $TMP ]]; then
        if ((KEEP_TMP)) || ((rc == 1)); then # keep configs and logs after an error
            log "temp dir kept: $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}

free_port() { "${PY[@]}" "$HELPERS/freeports.py" 1; }

is_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    grep -qE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# wait_listen PORT PID NAME: until PORT listens; dies if PID exits or after 10 s.
wait_listen() {
    local port=$1 pid=$2 name=$3 i
    for ((i = 0; i < 100; i++)); do
        proc_alive "$pid" || die "$name exited during startup; log $TMP/$name.log:
$(tail -n 20 "$TMP/$name.log" 2>/dev/null)"
        is_listening "$port" && return 0
        sleep 0.1
    done
    die "$name did not listen on 127.0.0.1:$port within 10 s; log $TMP/$name.log:
$(tail -n 20 "$TMP/$name.log" 2>/dev/null)"
}

# http_get PORT: one HTTP/1.0 request, prints the response (5 s limit).
http_get() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET / HTTP/1.0\r\nHost: bench\r\n\r\n" >&3 && cat <&3' _ "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# Backends: two nginx HTTP servers and one iperf3 server, started once.
# ---------------------------------------------------------------------------
nginx_user_line() { ((EUID == 0)) && echo "user $(id -un) $(id -gn);" || true; }

nginx_stream_load_line() { nginx_stream_builtin || echo "load_module $NGINX_STREAM_MODULE;"; }

# Each backend gets as many workers as there are cores (reuseport spreads
# connections over them): the direct row sends all its load to one backend,
# and with a single worker it would measure that worker, not the path without
# a proxy (on 2 cores: ~40k instead of ~90k keep-alive req/s).
start_backend_http() {
    local name=$1 port=$2 body=$3 dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
$(nginx_user_line)
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    server {
        listen 127.0.0.1:$port backlog=$BACKLOG reuseport;
        location / {
            default_type text/plain;
            return 200 "$body\n";
        }
    }
}
EOF
    spawn "$name" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
    wait_listen "$port" "$SPAWNED_PID" "$name"
    http_get "$port" | grep -q "$body" || die "backend $name on port $port does not answer '$body'"
}

start_backends() {
    local ports
    mapfile -t ports < <("${PY[@]}" "$HELPERS/freeports.py" 3)
    PORT_A=${ports[0]} PORT_B=${ports[1]} PORT_IPERF=${ports[2]}
    start_backend_http backend-a "$PORT_A" "Server A"
    start_backend_http backend-b "$PORT_B" "Server B"
    spawn iperf3-server iperf3 -s -B 127.0.0.1 -p "$PORT_IPERF"
    wait_listen "$PORT_IPERF" "$SPAWNED_PID" iperf3-server
    log "backends: nginx A :$PORT_A, nginx B :$PORT_B, iperf3 :$PORT_IPERF"
}

# ---------------------------------------------------------------------------
# Rows. start_<kind> NAME PORT EXTRA BACKEND... starts one proxy listening on
# 127.0.0.1:PORT and sets SPAWNED_PID.
# ---------------------------------------------------------------------------
# lb_optional_args: "--no-health-check --stats-period 0", minus whichever of
# these flags the lb binary does not know yet (older builds lack them).
lb_optional_args() {
    LB_OPTIONAL_ARGS=()
    if lb_has_flag --no-health-check; then
        LB_OPTIONAL_ARGS+=(--no-health-check)
    else
        log "note: $LB_BIN has no --no-health-check yet; running it without"
    fi
    if lb_has_flag --stats-period; then
        LB_OPTIONAL_ARGS+=(--stats-period 0)
    else
        log "note: $LB_BIN has no --stats-period yet; running it without"
    fi
}

start_lb() {
    local name=$1 port=$2 extra=$3; shift 3
    local extra_args=()
    read -r -a extra_args <<<"$extra"
    spawn "$name" "$LB_BIN" -p "$port" --bind 127.0.0.1 -b "$@" \
        --workers "$WORKERS" --max-connections "$MAXCONN" --buffer-size "$BUFSIZE" \
        --connection-timeout "$CONNECT_TIMEOUT" --idle-timeout "$IDLE_TIMEOUT" \
        "${LB_OPTIONAL_ARGS[@]}" "${extra_args[@]}"
}

# start_lbcmp: row lb-compare, the --compare binary with row lb's flags.
start_lbcmp() {
    local LB_BIN=$LB_CMP_BIN
    local LB_OPTIONAL_ARGS=("${LB_CMP_OPTIONAL_ARGS[@]}")
    start_lb "$@"
}

start_haproxy() {
    local name=$1 port=$2 extra=$3; shift 3
    local dir=$TMP/$name b i=0
    mkdir -p "$dir"
    {
        cat <<EOF
global
    nbthread $WORKERS
    maxconn $MAXCONN
    tune.bufsize $BUFSIZE
    tune.pipesize $BUFSIZE
    pidfile $dir/haproxy.pid

defaults
    mode tcp
    maxconn $MAXCONN
    timeout connect ${CONNECT_TIMEOUT}s
    timeout client ${IDLE_TIMEOUT}s
    timeout server ${IDLE_TIMEOUT}s

listen bench
    bind 127.0.0.1:$port
    backlog $BACKLOG
    balance leastconn
EOF
        tr ';' '\n' <<<"$extra" | sed -e 's/^ *//' -e '/^$/d' -e 's/^/    /'
        for b in "$@"; do
            echo "    server s$((i++)) $b"
        done
    } >"$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg" >"$dir/check.log" 2>&1 || die "haproxy config check failed ($dir/haproxy.cfg):
$(cat "$dir/check.log")"
    spawn "$name" haproxy -db -f "$dir/haproxy.cfg"
}

start_nginx() {
    local name=$1 port=$2 extra=$3; shift 3
    local dir=$TMP/$name b
    mkdir -p "$dir"
    {
        cat <<EOF
$(nginx_stream_load_line)
$(nginx_user_line)
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $NGINX_WORKER_CONNS; }
stream {
    upstream bench {
        least_conn;
EOF
        for b in "$@"; do echo "        server $b;"; done
        cat <<EOF
    }
    server {
        listen 127.0.0.1:$port backlog=$BACKLOG;
        proxy_pass bench;
        proxy_connect_timeout ${CONNECT_TIMEOUT}s;
        proxy_timeout ${IDLE_TIMEOUT}s;
        proxy_buffer_size $((BUFSIZE / 1024))k;
EOF
        tr ';' '\n' <<<"$extra" | sed -e 's/^ *//' -e '/^$/d' -e 's/^/        /' -e 's/$/;/'
        echo "    }"
        echo "}"
    } >"$dir/nginx.conf"
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" >"$dir/check.log" 2>&1 || die "nginx config check failed ($dir/nginx.conf):
$(cat "$dir/check.log")"
    spawn "$name" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
}

# start_row ROW MODE: MODE is http (backends A+B) or bulk (the iperf3 server only:
# its control and data connections must reach the same server). Sets TARGET_PORT
# (where the load goes) and PROXY_PID (empty for direct).
start_row() {
    local row=$1 mode=$2 kind=${ROW_KIND[$1]} backends
    if [[ $mode == http ]]; then
        backends=("127.0.0.1:$PORT_A" "127.0.0.1:$PORT_B")
    else
        backends=("127.0.0.1:$PORT_IPERF")
    fi
    if [[ $kind == direct ]]; then
        TARGET_PORT=${backends[0]##*:}
        PROXY_PID=""
        return
    fi
    TARGET_PORT=$(free_port)
    "start_$kind" "$row-$mode" "$TARGET_PORT" "${ROW_EXTRA[$row]}" "${backends[@]}"
    PROXY_PID=$SPAWNED_PID
    wait_listen "$TARGET_PORT" "$PROXY_PID" "$row-$mode"
    if [[ $mode == http ]]; then
        http_get "$TARGET_PORT" | grep -qE 'Server [AB]' \
            || die "$row does not proxy HTTP on port $TARGET_PORT; log $TMP/$row-$mode.log:
$(tail -n 20 "$TMP/$row-$mode.log" 2>/dev/null)"
    fi
}

stop_row() {
    [[ -n $PROXY_PID ]] && kill_tree "$PROXY_PID"
    PROXY_PID=""
}

# ---------------------------------------------------------------------------
# Measurements. Each records "round row metric value" lines into $RAW.
# ---------------------------------------------------------------------------
record() { printf '%s\t%s\t%s\t%s\n' "$ROUND" "$ROW" "$1" "$2" >>"$RAW"; }

calc() { awk "BEGIN { printf \"%.4f\", $1 }"; }

# kernel_sample: kernel work so far, read from /proc without forking.
#   K_SEGS    TCP segments sent (OutSegs of /proc/net/snmp): on loopback every
#             segment of the client, the proxy and the backends
#   K_SYS_CS  context switches of the whole machine (ctxt of /proc/stat)
#   K_IDLE, K_TIME  the machine's idle (idle + iowait) and total CPU time
#             in clock ticks (the cpu line of /proc/stat)
#   K_CPU     the proxy's user+system CPU time in clock ticks, and
#   K_CS      its context switches, voluntary and involuntary: both over
#             every thread of its process tree (0 for direct)
kernel_sample() {
    local row=() hdr=() i p t k v
    K_SEGS=0 K_SYS_CS=0 K_CPU=0 K_CS=0 K_IDLE=0 K_TIME=0
    while read -r -a row; do
        [[ ${row[0]} == Tcp: ]] || continue
        if ((${#hdr[@]} == 0)); then
            hdr=("${row[@]}")
            continue
        fi
        for i in "${!hdr[@]}"; do [[ ${hdr[i]} == OutSegs ]] && K_SEGS=${row[i]}; done
        break
    done </proc/net/snmp
    while read -r -a row; do
        if [[ ${row[0]} == cpu ]]; then
            # user nice system idle iowait irq softirq steal: the guest
            # fields after them are already counted in user and nice.
            for ((i = 1; i <= 8 && i < ${#row[@]}; i++)); do K_TIME=$((K_TIME + row[i])); done
            K_IDLE=$((row[4] + row[5]))
        elif [[ ${row[0]} == ctxt ]]; then
            K_SYS_CS=${row[1]}
            break
        fi
    done </proc/stat
    [[ -n $PROXY_PID ]] || return 0
    proc_sample "$PROXY_PID" # also sets TREE
    K_CPU=$S_CPU
    for p in "${TREE[@]}"; do
        for t in "/proc/$p/task/"*/status; do
            while read -r k v _; do
                [[ $k == voluntary_ctxt_switches: || $k == nonvoluntary_ctxt_switches: ]] && K_CS=$((K_CS + v))
            done 2>/dev/null <"$t" || true
        done
    done
    return 0
}

# counts_start LABEL / counts_stop: with --counts, perf counts the proxy's
# syscalls in between (every thread of every process in its tree). Sets
# N_SYSCALLS, N_EPOLL_WAITS and N_SPLICES ("" when not counted).
counts_start() {
    PERF_PID="" N_SYSCALLS="" N_EPOLL_WAITS="" N_SPLICES=""
    ((COUNTS)) && [[ -n $PROXY_PID ]] || return 0
    proc_tree "$PROXY_PID"
    PERF_OUT=$TMP/perf-$ROUND-$ROW-$1.csv
    local ctl=$TMP/perf-ctl ack=$TMP/perf-ack reply="" ctl_fd ack_fd
    [[ -p $ctl ]] || mkfifo "$ctl" "$ack"
    # Attached with its counters off; "enable" turns them on and the ack
    # says they are on, so the measurement starts counted.
    perf stat -x, -o "$PERF_OUT" -D -1 --control "fifo:$ctl,$ack" -e "$PERF_EVENTS" \
        -p "$(IFS=,; echo "${TREE[*]}")" >"$PERF_OUT.err" 2>&1 &
    PERF_PID=$!
    LIVE[$PERF_PID]=perf
    # Read-write opens of a FIFO do not wait for the other end.
    exec {ctl_fd}<>"$ctl" {ack_fd}<>"$ack"
    echo enable >&"$ctl_fd"
    read -r -t 10 -u "$ack_fd" reply || true
    exec {ctl_fd}>&- {ack_fd}<&-
    [[ $reply == ack* ]] || die "perf stat did not start counting on $ROW: $(cat "$PERF_OUT.err")"
}

counts_stop() {
    [[ -n $PERF_PID ]] || return 0
    local value event
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    unset "LIVE[$PERF_PID]"
    # A count stays "" unless perf reports it: a figure that was not
    # counted must not read as 0.
    while IFS=, read -r value _ event _; do
        [[ $value =~ ^[0-9]+$ ]] || continue
        case $event in
            raw_syscalls:sys_enter) N_SYSCALLS=$value ;;
            syscalls:sys_enter_epoll_wait | syscalls:sys_enter_epoll_pwait) N_EPOLL_WAITS=$((${N_EPOLL_WAITS:-0} + value)) ;;
            syscalls:sys_enter_splice) N_SPLICES=$value ;;
        esac
    done <"$PERF_OUT"
    [[ -n $N_SYSCALLS ]] || die "perf stat counted no syscalls of $ROW: $(cat "$PERF_OUT" "$PERF_OUT.err")"
}

# record_kernel LABEL UNITS PER: kernel work between kernel_sample/counts
# calls around a measurement, per request (UNITS requests, PER=req) or per
# GB (UNITS GB, PER=gb). K0_* hold the samples taken before.
record_kernel() {
    local label=$1 units=$2 per=$3 unit=us scale=1000000
    # CPU per request in µs, per GB in ms.
    [[ $per == gb ]] && unit=ms scale=1000
    record "${label}_segs_per_$per" "$(calc "($K_SEGS - $K0_SEGS) / $units")"
    record "${label}_sys_cs_per_$per" "$(calc "($K_SYS_CS - $K0_SYS_CS) / $units")"
    # Whether the load saturated the machine: then throughput is its CPU
    # divided by what one request costs everyone, the proxy included.
    if ((K_TIME > K0_TIME)); then
        record "${label}_idle_pct" "$(calc "100 * ($K_IDLE - $K0_IDLE) / ($K_TIME - $K0_TIME)")"
        # Busy time of every core together.
        record "${label}_machine_cpu_${unit}_per_$per" \
            "$(calc "(($K_TIME - $K0_TIME) - ($K_IDLE - $K0_IDLE)) * $scale / $CLK_TCK / $units")"
    fi
    [[ -n $PROXY_PID ]] || return 0
    record "${label}_cpu_${unit}_per_$per" "$(calc "($K_CPU - $K0_CPU) * $scale / $CLK_TCK / $units")"
    record "${label}_cs_per_$per" "$(calc "($K_CS - $K0_CS) / $units")"
    [[ -n $N_SYSCALLS ]] || return 0
    record "${label}_syscalls_per_$per" "$(calc "$N_SYSCALLS / $units")"
    [[ -n $N_EPOLL_WAITS ]] && record "${label}_epoll_waits_per_$per" "$(calc "$N_EPOLL_WAITS / $units")"
    # Small requests never reach a splice, so only bulk records them.
    [[ $per == gb && -n $N_SPLICES ]] && record "${label}_splices_per_$per" "$(calc "$N_SPLICES / $units")"
    return 0
}

# kernel_before LABEL: the samples record_kernel compares with.
kernel_before() {
    counts_start "$1"
    kernel_sample
    K0_SEGS=$K_SEGS K0_SYS_CS=$K_SYS_CS K0_CPU=$K_CPU K0_CS=$K_CS K0_IDLE=$K_IDLE K0_TIME=$K_TIME
}

# kernel_after: samples after a measurement, stopping perf first so that its
# own exit is not counted.
kernel_after() {
    counts_stop
    kernel_sample
}

# measure_wrk ka|cc: keep-alive or one connection per request.
measure_wrk() {
    local label=$1 out=$TMP/wrk-$ROUND-$ROW-$1.txt hdr=() rps reqs p50 p99 errs
    [[ $label == cc ]] && hdr=(-H 'Connection: close')
    kernel_before "$label"
    run_client "$out" "$out.err" timeout $((DURATION + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${DURATION}s" \
        --latency "${hdr[@]}" "http://127.0.0.1:$TARGET_PORT/" || die "wrk failed for $ROW ($label):
$(cat "$out" "$out.err")"
    kernel_after
    read -r rps reqs p50 p99 errs < <("${PY[@]}" "$HELPERS/parse.py" wrk "$out") \
        || die "cannot parse wrk output $out"
    ((reqs > 0)) || die "wrk made no requests through $ROW ($label): $out"
    record_kernel "$label" "$reqs" req
    record "${label}_rps" "$rps"
    record "${label}_p50_ms" "$p50"
    record "${label}_p99_ms" "$p99"
    record "${label}_errors" "$errs"
    log "  $ROW $label: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, errors $errs"
}

# measure_bulk fwd|rev: iperf3 client -> target -> iperf3 server (rev: -R).
measure_bulk() {
    local label=$1 out=$TMP/iperf-$ROUND-$ROW-$1.json rev=() gbps bytes
    [[ $label == rev ]] && rev=(-R)
    kernel_before "$label"
    run_client "$out" "$out.err" timeout $((BULK_DURATION + 30)) \
        iperf3 -c 127.0.0.1 -p "$TARGET_PORT" -t "$BULK_DURATION" -J "${rev[@]}" || die "iperf3 failed for $ROW ($label):
$(cat "$out.err"; "${PY[@]}" "$HELPERS/parse.py" iperf "$out" 2>&1)"
    kernel_after
    read -r gbps bytes < <("${PY[@]}" "$HELPERS/parse.py" iperf "$out") || die "cannot parse iperf3 output $out"
    ((bytes > 0)) || die "iperf3 moved no bytes through $ROW ($label): $out"
    record_kernel "$label" "($bytes / 1e9)" gb
    record "${label}_gbps" "$gbps"
    log "  $ROW $label: $gbps Gbit/s"
    sleep 0.3 # let the iperf3 server finish the test before the next one
}

# measure_hold: proxy RSS idle, then holding HOLD_CONNS idle client connections.
measure_hold() {
    [[ -n $PROXY_PID ]] || return 0
    local ready=$TMP/hold.ready hpid i rss0 fd0 rss1 fds est failed target
    sleep 0.3
    proc_sample "$PROXY_PID"
    rss0=$S_RSS fd0=$S_FDS
    rm -f "$ready"
    spawn "hold-$ROUND-$ROW" "${PY[@]}" "$HELPERS/hold.py" --port "$TARGET_PORT" --count "$HOLD_CONNS" \
        --ready-file "$ready" --connect-timeout 30 --max-hold 90
    hpid=$SPAWNED_PID
    for ((i = 0; i < 400; i++)); do
        [[ -s $ready ]] && break
        proc_alive "$hpid" || break
        sleep 0.1
    done
    [[ -s $ready ]] || die "hold.py did not get ready against $ROW; log $TMP/hold-$ROUND-$ROW.log:
$(tail -n 20 "$TMP/hold-$ROUND-$ROW.log")"
    read -r _ est failed <"$ready"
    # Ready when the proxy holds both sides (client + upstream) of ~every connection.
    target=$((fd0 + 2 * est * 99 / 100))
    for ((i = 0; i < 150; i++)); do
        proc_sample "$PROXY_PID"
        rss1=$S_RSS fds=$S_FDS
        ((fds >= target)) && break
        sleep 0.1
    done
    ((fds >= target)) || log "  warning: $ROW holds only $((fds - fd0)) fds for $est connections"
    sleep 0.5
    proc_sample "$PROXY_PID"
    rss1=$S_RSS fds=$S_FDS
    kill_tree "$hpid"
    record rss_idle_kib "$rss0"
    record rss_held_kib "$rss1"
    record held_conns "$est"
    record kib_per_conn "$(calc "($rss1 - $rss0) / $HOLD_CONNS")"
    ((failed == 0)) || log "  warning: $failed of $HOLD_CONNS connections to $ROW failed"
    log "  $ROW hold: rss idle $rss0 KiB, holding $est conns $rss1 KiB, $(calc "($rss1 - $rss0) / $HOLD_CONNS") KiB/conn"
    # Let the proxy close the upstream sides before the next measurement.
    for ((i = 0; i < 150; i++)); do
        proc_sample "$PROXY_PID"
        rss1=$S_RSS fds=$S_FDS
        ((fds <= fd0 + 16)) && break
        sleep 0.1
    done
    sleep 0.3
}

run_row() {
    ROW=$1
    log "round $ROUND/$ROUNDS: $ROW"
    start_row "$ROW" http
    measure_hold
    measure_wrk ka
    measure_wrk cc
    stop_row
    start_row "$ROW" bulk
    measure_bulk fwd
    measure_bulk rev
    stop_row
}

# busy_percent: CPU busy % of the whole machine over one second (before we start).
busy_percent() {
    local PROXY_PID="" t0 i0 tot idle
    kernel_sample
    t0=$K_TIME i0=$K_IDLE
    sleep 1
    kernel_sample
    tot=$((K_TIME - t0)) idle=$((K_IDLE - i0))
    ((tot > 0)) && echo $((100 * (tot - idle) / tot)) || echo 0
}

# warm_up: a short unmeasured keep-alive run straight at a backend, so that the
# first row does not pay for cold caches and sleeping CPUs.
warm_up() {
    run_client "$TMP/warm-up.txt" "$TMP/warm-up.err" timeout 30 wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d2s \
        "http://127.0.0.1:$PORT_A/" || die "warm-up wrk against backend A failed: $(cat "$TMP/warm-up.txt" "$TMP/warm-up.err")"
}

# ---------------------------------------------------------------------------
# Metadata and report
# ---------------------------------------------------------------------------
first_line() { "$@" 2>&1 | sed -n '1{s/[[:space:]]*$//;p}' || true; }

write_meta() {
    local has_lb=0 r
    for r in "${ROWS[@]}"; do [[ ${ROW_KIND[$r]} == lb ]] && has_lb=1; done
    {
        printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
        printf 'machine\t%s cores, %s\n' "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
        printf 'kernel\t%s\n' "$(uname -r)"
        printf 'haproxy\t%s\n' "$(first_line haproxy -v)"
        printf 'nginx\t%s\n' "$(first_line nginx -v)"
        printf 'wrk\t%s\n' "$(first_line wrk -v)"
        printf 'iperf3\t%s\n' "$(first_line iperf3 --version)"
        if ((has_lb)); then
            printf 'lb\t%s (%s)\n' "$(first_line "$LB_BIN" --version)" "$LB_BIN"
        fi
        if [[ -n $LB_CMP_BIN ]]; then
            printf 'lb-compare\t%s (%s)\n' "$(first_line "$LB_CMP_BIN" --version)" "$LB_CMP_BIN"
        fi
        printf 'rustc\t%s\n' "$(command -v rustc >/dev/null && first_line rustc --version || echo n/a)"
        printf 'gnuplot\t%s\n' "$(first_line gnuplot --version)"
        printf 'python3\t%s\n' "$(first_line "${PY[0]}" --version)"
        printf 'machine busy before start\t%s%% CPU, load average %s\n' "$BUSY_BEFORE" "$(cut -d' ' -f1-3 /proc/loadavg)"
        printf 'rounds\t%s\n' "$ROUNDS"
        printf 'rows\t%s\n' "$(IFS=,; echo "${ROWS[*]}")"
        printf 'kinds\t%s\n' "$(for r in "${ROWS[@]}"; do printf '%s=%s,' "$r" "${ROW_KIND[$r]}"; done | sed 's/,$//')"
        printf 'wrk args\t-t%s -c%s -d%ss --latency (conn/request: -H '"'"'Connection: close'"'"')\n' "$WRK_THREADS" "$WRK_CONNS" "$DURATION"
        printf 'iperf3 args\t-t %s -J, forward and -R\n' "$BULK_DURATION"
        printf 'settings\tworkers/nbthread/worker_processes %s, buffer and pipe %s B, connect timeout %ss, idle timeout %ss, maxconn %s, held connections %s\n' \
            "$WORKERS" "$BUFSIZE" "$CONNECT_TIMEOUT" "$IDLE_TIMEOUT" "$MAXCONN" "$HOLD_CONNS"
        ((COUNTS)) && printf 'perf\t%s, counting %s\n' "$(first_line perf --version)" "$PERF_EVENTS"
        printf 'sessions\t%s (scheduler autogroups %s)\n' "$( ((OWN_SESSIONS)) && echo "each server its own" || echo "all in the benchmark's")" \
            "$( [[ $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null) == 1 ]] && echo on || echo off)"
        printf 'command\tscripts/bench.sh %s\n' "$ARGS_STR"
        printf 'raw\t%s\n' "$(basename "$RAW")"
    } >"$META"
}

# make_report: results.md and chart.png (results-own-sessions.md and
# chart-own-sessions.png for --own-sessions, so that a run of the other
# method never replaces the published one), or, for --compare (an A/B of two
# builds, not a result to publish), compare-<stamp>.md and .png. A --counts
# run writes counts.md (counts-own-sessions.md, or its compare-<stamp>.md)
# and no chart: report.py writes no chart script for it.
make_report() {
    local md=$OUT_DIR/results.md png=$OUT_DIR/chart.png
    if [[ -n $LB_CMP_BIN ]]; then
        md=$OUT_DIR/compare-$STAMP.md png=$OUT_DIR/compare-$STAMP.png
    elif ((COUNTS && OWN_SESSIONS)); then
        md=$OUT_DIR/counts-own-sessions.md png=$OUT_DIR/counts-own-sessions.png
    elif ((COUNTS)); then
        md=$OUT_DIR/counts.md png=$OUT_DIR/counts.png
    elif ((OWN_SESSIONS)); then
        md=$OUT_DIR/results-own-sessions.md png=$OUT_DIR/chart-own-sessions.png
    fi
    # Both are made in TMP and moved into place together, so that a failed
    # gnuplot leaves the last report beside its own chart.
    local tmp_md=$TMP/report.md tmp_png=$TMP/${png##*/}
    "${PY[@]}" "$HELPERS/report.py" --raw "$RAW" --meta "$META" --md "$tmp_md" \
        --chart-data "$TMP/chart.dat" --chart-script "$TMP/chart.gp" --chart-png "$tmp_png" \
        || die "report.py failed"
    local wrote="$md, $RAW"
    if [[ -e $TMP/chart.gp ]]; then
        gnuplot "$TMP/chart.gp" 2>"$TMP/gnuplot.log" || die "gnuplot failed: $(cat "$TMP/gnuplot.log")"
        mv "$tmp_png" "$png"
        wrote="$md, $png, $RAW"
    fi
    mv "$tmp_md" "$md"
    echo
    cat "$md"
    echo
    log "wrote $wrote"
}

main() {
    ARGS_STR="$*"
    parse_args "$@"
    install_deps
    check_perf
    # The helpers need only the stdlib: run the interpreter itself (not a
    # version-manager shim) without site-packages, so each call starts fast.
    PY=("$(python3 -c 'import sys; print(sys.executable)')" -S)
    ensure_lb
    ((${#ROWS[@]})) || die "no rows left to run"
    fit_durations
    raise_nofile
    CLK_TCK=$(getconf CLK_TCK)

    TMP=$(mktemp -d "${TMPDIR:-/tmp}/lb-bench.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    mkdir -p "$OUT_DIR"
    STAMP=$(date -u +%Y%m%dT%H%M%SZ)
    RAW=$OUT_DIR/raw-$STAMP.tsv
    META=$TMP/meta.tsv
    printf 'round\trow\tmetric\tvalue\n' >"$RAW"

    log "rows: ${ROWS[*]}; $ROUNDS round(s); wrk ${DURATION}s, iperf3 ${BULK_DURATION}s; estimated $((ESTIMATE / 60)) min $((ESTIMATE % 60)) s"
    BUSY_BEFORE=$(busy_percent)
    ((BUSY_BEFORE < 20)) || log "warning: the machine is already ${BUSY_BEFORE}% busy before the benchmark; results will be noisy"
    start_backends
    write_meta
    warm_up

    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        order=("${ROWS[@]}")
        if [[ -n $LB_CMP_BIN ]] && ((ROUND % 2 == 0)); then
            # An A/B of two builds: B A on even rounds, so neither always
            # runs right after the other's connections close.
            order=()
            for ((i = ${#ROWS[@]} - 1; i >= 0; i--)); do order+=("${ROWS[i]}"); done
        fi
        for r in "${order[@]}"; do run_row "$r"; done
    done
    ROUND=0 ROW=""
    printf 'load average at end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$META"
    # Whether lb steered clients to its workers: --steer needs root or
    # CAP_BPF, so a run without them measures the kernel's hash instead.
    if [[ -f $TMP/lb-http.log ]]; then
        steering=$(grep -m1 -o 'steering: .*' "$TMP/lb-http.log" || echo 'steering: not reported by this lb')
        printf 'lb steering\t%s\n' "${steering#steering: }" >>"$META"
    fi
    make_report
}

main "$@"
