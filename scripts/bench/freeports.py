#!/usr/bin/env python3
"""Print N distinct free TCP ports on 127.0.0.1, one per line (stdlib only)."""
import socket
import sys


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        for s in socks:
            print(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
