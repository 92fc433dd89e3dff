#!/usr/bin/env bash
# Installs lb, its systemd units and an example /etc/default/lb.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: scripts/install.sh [--binary PATH] [--help]

Installs:
  target/release/lb     -> \$DESTDIR\$PREFIX/bin/lb   (built with cargo if missing or stale)
  systemd/lb.service    -> \$DESTDIR\$UNITDIR/lb.service
  systemd/lb.socket     -> \$DESTDIR\$UNITDIR/lb.socket
  systemd/lb.default    -> \$DESTDIR/etc/default/lb   (only if it does not exist yet)
then runs 'systemctl daemon-reload' if systemd is running and DESTDIR is empty.
Nothing is enabled or started.

Options:
  --binary PATH   install this lb binary instead of building target/release/lb
  -h, --help      show this help

Environment:
  PREFIX    installation prefix (default /usr/local); ExecStart= follows it
  DESTDIR   staging root prepended to every path, e.g. for packaging or tests
            (default empty: install into the live system)
  UNITDIR   unit directory (default /etc/systemd/system)
  CARGO     cargo command used to build (default cargo)
USAGE
}

binary=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --binary)
            [ $# -ge 2 ] || { echo "install.sh: --binary needs a path" >&2; exit 2; }
            binary=$2; shift 2 ;;
        --binary=*) binary=${1#--binary=}; shift ;;
        *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CARGO=${CARGO:-cargo}

case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: PREFIX must be an absolute path, got '$PREFIX'" >&2; exit 2 ;;
esac
# ExecStart= is split on whitespace and the prefix is substituted with sed.
case "$PREFIX" in
    *[[:space:]\|\&\\]*) echo "install.sh: unsupported character in PREFIX '$PREFIX'" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "$binary" ]; then
    binary=${CARGO_TARGET_DIR:-$repo/target}/release/lb
    # "Stale" is judged by mtime, which is enough to catch forgetting to
    # rebuild after a pull; cargo itself decides what actually recompiles.
    if [ ! -x "$binary" ] ||
        [ -n "$(find "$repo/src" "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$binary" -print -quit)" ]; then
        if ! command -v "$CARGO" >/dev/null 2>&1; then
            # Typical under sudo, where root has no Rust toolchain.
            echo "install.sh: $binary is missing or stale and '$CARGO' is not in PATH;" >&2
            echo "build it first as your user (cargo build --release) or pass --binary" >&2
            exit 1
        fi
        echo "building $binary"
        (cd "$repo" && "$CARGO" build --release --bin lb)
    fi
fi
[ -f "$binary" ] && [ -x "$binary" ] || { echo "install.sh: $binary is not an executable file" >&2; exit 1; }

bindir=$DESTDIR$PREFIX/bin
unitdir=$DESTDIR$UNITDIR
defaults=$DESTDIR/etc/default/lb

install -d -m 0755 "$bindir" "$unitdir"
install -m 0755 "$binary" "$bindir/lb"
echo "installed $bindir/lb"

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s|^ExecStart=/usr/local/bin/lb\\b|ExecStart=$PREFIX/bin/lb|" "$repo/systemd/lb.service" >"$tmp"
if ! grep -q "^ExecStart=$PREFIX/bin/lb\\b" "$tmp"; then
    echo "install.sh: could not point ExecStart= of lb.service at $PREFIX/bin/lb" >&2
    exit 1
fi
install -m 0644 "$tmp" "$unitdir/lb.service"
install -m 0644 "$repo/systemd/lb.socket" "$unitdir/lb.socket"
echo "installed $unitdir/lb.service $unitdir/lb.socket"

# The defaults file holds the operator's configuration; never overwrite it.
if [ -e "$defaults" ]; then
    echo "kept existing $defaults"
else
    install -d -m 0755 "$(dirname "$defaults")"
    install -m 0644 "$repo/systemd/lb.default" "$defaults"
    echo "installed $defaults (edit LB_OPTS before starting lb)"
fi

# /run/systemd/system exists exactly when systemd is PID 1 (see sd_booted(3));
# a staged DESTDIR install must not touch the running manager.
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    echo "reloaded systemd"
fi
if [ -z "$DESTDIR" ]; then
    cat <<NEXT
next steps: edit /etc/default/lb, then either
  systemctl enable --now lb.service   # lb binds -p/--bind itself
or
  systemctl enable --now lb.socket    # systemd binds the port (see lb.socket)
NEXT
fi
