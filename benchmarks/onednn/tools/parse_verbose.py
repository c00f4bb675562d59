"""Time per oneDNN primitive kind from an ONEDNN_VERBOSE=1 log: python tools/parse_verbose.py LOG."""

import collections
import sys

t = collections.defaultdict(float)
n = collections.Counter()
with open(sys.argv[1]) as f:
    for line in f:
        p = line.strip().split(",")
        if len(p) > 5 and p[0] == "onednn_verbose" and p[1] == "exec":
            if p[3] == "convolution" and "mb128" not in line:
                continue
            key = p[3] + ":" + p[4] + ":" + p[5]
            t[key] += float(p[-1])
            n[key] += 1
tot = sum(t.values())
for k, v in sorted(t.items(), key=lambda kv: -kv[1]):
    print(f"{v:9.1f} ms {100 * v / tot:5.1f}% n={n[k]:3d} {k}")
