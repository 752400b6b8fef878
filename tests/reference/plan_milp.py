"""The physical optimum of a planning day, as a MILP solved by SciPy's HiGHS: an independent
reference for the EMS planner (tests/planner_exact.rs).

Physics, written from the problem, not from the EMS's code: per battery and step a binary
says charge or discharge (never both), per step a binary says import or export (never
both); energy follows the AC powers through the efficiencies; SOC stays within its bounds;
PV may be curtailed (on each hybrid, and elsewhere); a hybrid's PV not curtailed plus its
battery stays within its AC rating; export and import stay within their limits.

Input on stdin: a JSON object (the planner's inputs, W, Wh, prices per kWh); output on
stdout: {"status": ..., "objective": ..., "cost": ...}."""
import json
import sys

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix


def main():
    d = json.load(sys.stdin)
    n = len(d["import_price"])
    dt = d["step_s"] / 3600.0
    bats = d["batteries"]
    nb = len(bats)
    kw = 1000.0
    pv = np.array(d["pv_w"]) / kw
    load = np.array(d["load_w"]) / kw
    shares = [b["pv_share"] for b in bats]
    pv_rest = pv * max(0.0, 1.0 - sum(shares))
    exp_cap = max(d["export_limit_w"], 0.0) / kw
    imp_cap = d["import_limit_w"]
    big = float(load.max() + sum(b["max_charge_w"] for b in bats) / kw + 1.0)
    imp_cap = big if imp_cap is None else imp_cap / kw

    # Variable layout.
    names = {}
    lo, hi, integ, cost = [], [], [], []

    def var(key, l, h, c=0.0, integer=False):
        names[key] = len(lo)
        lo.append(l)
        hi.append(h)
        integ.append(1 if integer else 0)
        cost.append(c)

    mean_import = sum(d["import_price"]) / n
    for t in range(n):
        var(("imp", t), 0, imp_cap, d["import_price"][t] * dt)
        var(("exp", t), 0, exp_cap, -d["export_price"][t] * dt)
        var(("cur", t), 0, pv_rest[t])
        var(("y", t), 0, 1, integer=True)
    for b, bat in enumerate(bats):
        term = d["terminal_value_per_kwh"]
        if term is None:
            term = mean_import * bat["discharge_efficiency"]
        floor = max(bat["soc_min_pct"], d["reserve_pct"])
        for t in range(n):
            cyc = d["cycling_cost_per_kwh"] * dt
            var(("c", b, t), 0, bat["max_charge_w"] / kw, cyc)
            var(("d", b, t), 0, bat["max_discharge_w"] / kw, cyc)
            var(("e", b, t), bat["capacity_wh"] * floor / 100 / kw,
                bat["capacity_wh"] * bat["soc_max_pct"] / 100 / kw,
                -term if t == n - 1 else 0.0)
            var(("pvc", b, t), 0, pv[t] * shares[b])
            var(("z", b, t), 0, 1, integer=True)

    rows, rlo, rhi = [], [], []

    def row(coefs, l, h):
        rows.append(coefs)
        rlo.append(l)
        rhi.append(h)

    inf = np.inf
    for t in range(n):
        # imp - exp - cur - sum(pvc) - sum(c - d) = load - pv
        coefs = {names[("imp", t)]: 1, names[("exp", t)]: -1, names[("cur", t)]: -1}
        for b in range(nb):
            coefs[names[("c", b, t)]] = -1
            coefs[names[("d", b, t)]] = 1
            coefs[names[("pvc", b, t)]] = -1
        row(coefs, load[t] - pv[t], load[t] - pv[t])
        # import only when y = 1, export only when y = 0
        row({names[("imp", t)]: 1, names[("y", t)]: -imp_cap}, -inf, 0)
        row({names[("exp", t)]: 1, names[("y", t)]: exp_cap}, -inf, exp_cap)
    for b, bat in enumerate(bats):
        e0 = bat["capacity_wh"] * bat["soc_pct"] / 100 / kw
        cmax, dmax = bat["max_charge_w"] / kw, bat["max_discharge_w"] / kw
        for t in range(n):
            coefs = {names[("e", b, t)]: 1,
                     names[("c", b, t)]: -bat["charge_efficiency"] * dt,
                     names[("d", b, t)]: dt / bat["discharge_efficiency"]}
            rhs = 0.0
            if t == 0:
                rhs = e0
            else:
                coefs[names[("e", b, t - 1)]] = -1
            row(coefs, rhs, rhs)
            row({names[("c", b, t)]: 1, names[("z", b, t)]: -cmax}, -inf, 0)
            row({names[("d", b, t)]: 1, names[("z", b, t)]: dmax}, -inf, dmax)
            rated = bat["rated_w"]
            if rated is not None:
                # own PV - curtailed + discharge - charge <= rating
                row({names[("pvc", b, t)]: -1, names[("d", b, t)]: 1, names[("c", b, t)]: -1},
                    -inf, rated / kw - pv[t] * shares[b])

    a = lil_matrix((len(rows), len(lo)))
    for r, coefs in enumerate(rows):
        for j, v in coefs.items():
            a[r, j] = v
    res = milp(np.array(cost), integrality=np.array(integ),
               bounds=Bounds(np.array(lo), np.array(hi)),
               constraints=LinearConstraint(a.tocsr(), np.array(rlo), np.array(rhi)),
               options={"mip_rel_gap": 1e-7, "time_limit": 120})
    if res.x is None:
        print(json.dumps({"status": res.message, "objective": None, "cost": None}))
        return
    x = res.x
    energy_cost = sum((d["import_price"][t] * x[names[("imp", t)]]
                       - d["export_price"][t] * x[names[("exp", t)]]) * dt for t in range(n))
    print(json.dumps({"status": res.message, "objective": res.fun, "cost": energy_cost}))


if __name__ == "__main__":
    main()
