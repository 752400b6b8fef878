#!/usr/bin/env python3
"""The least PV curtailment that keeps a site within its per-phase export and import limits,
solved with SciPy's HiGHS: an optimum found independently of site-ems's own solve.

Reads a JSON list of snapshots on stdin, each
  {"units": [{"phases": [0, 1, 2], "rated_w": .., "pv_w": .., "charge_w": .., "discharge_w": ..}],
   "net_w": [L1, L2, L3],            # grid power per phase (+ import) with every unit at 0 W
   "export_w": X, "import_w": Y or null}   # per-phase allowances
and prints a list with, for each, {"curtailed_w": ..} or {"infeasible": true}.

Physics, per unit: battery b in [-charge_w, discharge_w], PV used q in [0, pv_w], AC output
q + b within [-rated_w, rated_w], spread evenly over the unit's phases. Batteries all charge or
all discharge (never one from another), so the LP is solved once for each direction.
"""
import json
import sys

import numpy as np
from scipy.optimize import linprog


def solve(s, direction):
    units = s["units"]
    n = len(units)
    # Variables: b_0..b_{n-1}, q_0..q_{n-1}. Minimise -sum(q) (= curtailment - total PV).
    c = np.concatenate([np.zeros(n), -np.ones(n)])
    bounds = []
    for u in units:
        lo, hi = -u["charge_w"], u["discharge_w"]
        if direction > 0:
            lo = max(lo, 0.0)
        else:
            hi = min(hi, 0.0)
        bounds.append((lo, hi))
    bounds += [(0.0, u["pv_w"]) for u in units]
    a, rhs = [], []
    for i, u in enumerate(units):
        row = np.zeros(2 * n)
        row[i] = row[n + i] = 1.0
        a.append(row.copy())
        rhs.append(u["rated_w"])
        a.append(-row)
        rhs.append(u["rated_w"])
    for k in range(3):
        w = np.zeros(2 * n)
        for i, u in enumerate(units):
            if k in u["phases"]:
                w[i] = w[n + i] = 1.0 / len(u["phases"])
        # export on phase k: -(net - delivered) <= X  ->  delivered <= X + net
        a.append(w)
        rhs.append(s["export_w"] + s["net_w"][k])
        if s["import_w"] is not None:
            # import: net - delivered <= Y  ->  -delivered <= Y - net
            a.append(-w)
            rhs.append(s["import_w"] - s["net_w"][k])
    r = linprog(c, A_ub=np.array(a), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if r.status != 0:
        return None
    pv = sum(u["pv_w"] for u in units)
    return pv + r.fun


def optimum(s):
    best = [x for x in (solve(s, 1), solve(s, -1)) if x is not None]
    if not best:
        return {"infeasible": True}
    return {"curtailed_w": max(0.0, min(best))}


def main():
    print(json.dumps([optimum(s) for s in json.load(sys.stdin)]))


if __name__ == "__main__":
    main()
