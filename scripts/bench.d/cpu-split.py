#!/usr/bin/env python3
"""CPU time per process over an interval, Postgres backends counted under their client.

usage: scripts/bench.d/cpu-split.py [seconds (default 5)]

Prints how busy the machine was (and how much of it was steal, which a shared machine shows),
then each process name's CPU in percent of one core, user plus system, from /proc. A
Postgres backend is listed as `pg<-<client>`: the process at the other end of its TCP
connection (found with `ss -tnp`), so a service's database work shows beside the service.
Run it while a load runs; divide by the load's rate for CPU per request.
"""

import collections
import os
import re
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def port_owners():
    """Client port -> process name, for TCP connections to port 5432."""
    owners = {}
    try:
        out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return owners
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[4].endswith(":5432"):
            m = re.search(r'\(\("([^"]+)"', line)
            if m:
                owners[parts[3].rsplit(":", 1)[1]] = m.group(1)
    return owners


def snapshot(owners):
    """pid -> (group name, CPU ticks)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        if cmd.startswith("postgres:"):
            m = re.search(r"\((\d+)\)", cmd)
            name = "pg<-" + owners.get(m.group(1), "?") if m else "pg:" + " ".join(cmd.split()[2:4])
        out[pid] = (name, ticks)
    return out


def machine():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
owners = port_owners()
before, m0, t0 = snapshot(owners), machine(), time.time()
time.sleep(seconds)
owners.update(port_owners())
after, m1, elapsed = snapshot(owners), machine(), time.time() - t0

total = sum(m1) - sum(m0)
idle = (m1[3] + m1[4]) - (m0[3] + m0[4])
steal = m1[7] - m0[7]
print(f"machine busy {100 * (total - idle) / total:.0f}% of {os.cpu_count()} cores (steal {100 * steal / total:.0f}%)")
per_group = collections.Counter()
for pid, (name, ticks) in after.items():
    per_group[name] += ticks - (before[pid][1] if pid in before else 0)
for name, ticks in per_group.most_common(20):
    if ticks > 0:
        print(f"{100 * ticks / HZ / elapsed:6.1f}%  {name}")
