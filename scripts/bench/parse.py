#!/usr/bin/env python3
"""Parse load-generator output into one line of numbers (stdlib only).

usage: parse.py wrk FILE    -> "<req_per_s> <requests> <p50_ms> <p99_ms> <errors>"
       parse.py iperf FILE  -> "<gbit_per_s> <bytes>"   (iperf3 -J output)
Exits non-zero with a message when the output is not usable.
"""
import json
import re
import sys

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def die(msg):
    print(f"parse.py: {msg}", file=sys.stderr)
    sys.exit(1)


def latency_ms(text, pct):
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if not m:
        die(f"no {pct}% latency in wrk output (was --latency given?)")
    return float(m.group(1)) * UNITS_MS[m.group(2)]


def parse_wrk(text):
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not m:
        die("no 'Requests/sec' in wrk output")
    rps = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not m:
        die("no 'N requests in' line in wrk output")
    reqs = int(m.group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    print(f"{rps:.2f} {reqs} {latency_ms(text, 50):.4f} {latency_ms(text, 99):.4f} {errors}")


def parse_iperf(text):
    try:
        doc = json.loads(text)
    except ValueError as e:
        die(f"iperf3 output is not JSON: {e}")
    if doc.get("error"):
        die(f"iperf3 error: {doc['error']}")
    try:
        recv = doc["end"]["sum_received"]
    except KeyError:
        die("iperf3 JSON has no end.sum_received")
    print(f"{recv['bits_per_second'] / 1e9:.4f} {int(recv['bytes'])}")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("wrk", "iperf"):
        die("usage: parse.py wrk|iperf FILE")
    with open(sys.argv[2]) as f:
        text = f.read()
    (parse_wrk if sys.argv[1] == "wrk" else parse_iperf)(text)


if __name__ == "__main__":
    main()
