"""The official SunSpec model definitions as pysunspec2 ships them, flattened the way our
tables are: {"models": [{"id", "name", "len", "points": [[name, offset, type, size, sf]]}]}.

Input (stdin, JSON): {"ids": [1, 103, ...]}. Repeating groups are flattened once, named
"Group.Point"; `len` is L (registers after ID and L)."""

import json
import sys

import sunspec2.device as device
import sunspec2.mdef as mdef


def main():
    req = json.load(sys.stdin)
    out = []
    for mid in req["ids"]:
        g = device.get_model_def(mid)[mdef.GROUP]
        points = []
        off = 0

        def add(prefix, p):
            nonlocal off
            sf = p.get(mdef.SF)
            points.append([prefix + p[mdef.NAME], off, p[mdef.TYPE], p[mdef.SIZE], sf])
            off += p[mdef.SIZE]

        for p in g[mdef.POINTS]:
            add("", p)
        for sub in g.get(mdef.GROUPS, []):
            for p in sub[mdef.POINTS]:
                add(sub[mdef.NAME] + ".", p)
        out.append({"id": mid, "name": g[mdef.NAME], "len": off - 2, "points": points})
    print(json.dumps({"models": out}))


main()
