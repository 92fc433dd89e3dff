#!/usr/bin/env python3
"""Open N idle TCP connections to HOST:PORT and hold them (stdlib only).

usage: hold.py --port P [--host 127.0.0.1] [--count 5000] [--batch 250]
               --ready-file F [--max-hold 120]

Connects in batches (so the target's listen backlog is never flooded), waits
until every connection is established, then writes "READY <established>
<failed>" to the ready file and holds all connections without sending a byte.
On SIGTERM/SIGINT (or after --max-hold seconds, so it always ends by itself)
it closes them all and exits 0. Exits 1 if fewer than --count connected.
"""
import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import sys
import time


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    for target in (need, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
            return
        except (ValueError, OSError):
            continue
    sys.exit(f"hold.py: RLIMIT_NOFILE is {soft} (hard {hard}), need {need}: raise ulimit -n")


def connect_batch(host, port, n, deadline):
    """Start n non-blocking connects; return (established sockets, failures)."""
    sel = selectors.DefaultSelector()
    pending = 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            continue
        sel.register(s, selectors.EVENT_WRITE)
        pending += 1
    ok, failed = [], n - pending
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            sel.unregister(s)
            pending -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok.append(s)
            else:
                s.close()
                failed += 1
    for key in list(sel.get_map().values()):  # still pending at deadline
        key.fileobj.close()
        failed += 1
    sel.close()
    return ok, failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--max-hold", type=float, default=120.0)
    a = ap.parse_args()

    raise_nofile(a.count + 64)
    stop = {"flag": False}

    def on_signal(_signo, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    deadline = time.monotonic() + a.connect_timeout
    held, failed = [], 0
    while len(held) + failed < a.count and not stop["flag"]:
        n = min(a.batch, a.count - len(held) - failed)
        ok, bad = connect_batch(a.host, a.port, n, deadline)
        held += ok
        failed += bad
        if time.monotonic() >= deadline:
            failed += a.count - len(held) - failed
            break

    tmp = a.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"READY {len(held)} {failed}\n")
    os.replace(tmp, a.ready_file)

    end = time.monotonic() + a.max_hold
    while not stop["flag"] and time.monotonic() < end:
        time.sleep(0.05)
    for s in held:
        s.close()
    return 0 if len(held) == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
