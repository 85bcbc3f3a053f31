#!/usr/bin/env python3
"""Leaf-symbol profile of a `perf record` of the controller, by thread.

perf 6.1 on this machine cannot read the release binary ("symsrc__init:
cannot get elf header"), so this resolves the sampled addresses against
`nm` of the unstripped binary itself. Build it unstripped:
  CARGO_PROFILE_RELEASE_STRIP=false cargo build --release -p fleetcmd-controller
Usage: scripts/perf-symbols.py BINARY PERF.DATA [TOP]
"""
import subprocess, bisect, sys, collections, re

binary = sys.argv[1]
data = sys.argv[2]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
nm = subprocess.run(["nm", "-C", "--defined-only", "-n", binary], capture_output=True, text=True).stdout.splitlines()
addrs, names = [], []
for l in nm:
    p = l.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        addrs.append(int(p[0], 16)); names.append(p[2])
# perf prints file offsets for a DSO it could not load; map them to virtual
# addresses through the executable LOAD segment.
delta = 0
for l in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout.splitlines():
    f = l.split()
    if f and f[0] == "LOAD" and "E" in f[6:-1]:
        delta = int(f[2], 16) - int(f[1], 16)


def sym(off):
    v = off + delta
    i = bisect.bisect_right(addrs, v) - 1
    return names[i] if i >= 0 else "?"
out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,dso"], capture_output=True, text=True).stdout
samples = out.split("\n\n")
c = collections.Counter(); total = 0
for s in samples:
    lines = [l for l in s.strip().splitlines()]
    if len(lines) < 2: continue
    comm = lines[0].strip()
    comm = re.sub(r"-\d+$", "-N", comm)
    leaf = lines[1].strip()
    m = re.match(r"([0-9a-f]+) \((.*)\)", leaf)
    if not m: continue
    ip, dso = m.groups(); total += 1
    if "fleetcmd-controller" in dso:
        name = sym(int(ip, 16))
        name = re.sub(r"::h[0-9a-f]{16}$", "", name)
        name = re.sub(r"<.*?>", "<..>", name) if len(name) > 120 else name
    else:
        name = "[" + dso.split("/")[-1] + "]"
    c[(comm, name[:110])] += 1
for (comm, name), n in c.most_common(top):
    print(f"{100*n/total:5.1f}% {comm:16} {name}")
print("samples", total)
