#!/usr/bin/env python3
"""Resource snapshot of a process and all its descendants (stdlib only).

usage: procstat.py PID          prints one line
       procstat.py --tree PID   prints the PIDs of the tree, one per line
one line: "<cpu_ticks> <rss_kib> <open_fds> <nprocs>"
  cpu_ticks: utime+stime (fields 14+15 of /proc/P/stat, clock ticks) summed
             over the process tree; /proc/P/stat already covers all threads.
  rss_kib:   VmRSS summed over the process tree.
  open_fds:  entries in /proc/P/fd summed over the process tree.
"""
import os
import sys


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm (field 2) may contain spaces/parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(stat_fields(name)[1])  # field 4
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root):
    kids = children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--tree":
        print("\n".join(str(p) for p in tree(int(sys.argv[2]))))
        return 0
    root = int(sys.argv[1])
    if not os.path.exists(f"/proc/{root}"):
        print(f"procstat: no such process {root}", file=sys.stderr)
        return 1
    cpu = rss = fds = n = 0
    for pid in tree(root):
        try:
            f = stat_fields(pid)
            ticks = int(f[11]) + int(f[12])  # fields 14 (utime), 15 (stime)
            r = 0
            with open(f"/proc/{pid}/status") as st:
                for line in st:
                    if line.startswith("VmRSS:"):
                        r = int(line.split()[1])
                        break
            nf = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError, IndexError):
            continue  # process vanished meanwhile
        cpu += ticks
        rss += r
        fds += nf
        n += 1
    print(cpu, rss, fds, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
