"""Build the EMS planner's LP with PuLP, per battery (no aggregation), solve it with CBC,
and print {"objective": ..., "solve_s": ...} as JSON. Input: the JSON the `planner` bench
writes. With `--milp`, binaries forbid charging and discharging a battery at once and
importing and exporting at once: the physical optimum. Used only by `cargo bench --bench
planner`."""
import json
import sys
import time

import pulp


def main(path, milp=False):
    d = json.load(open(path))
    n = len(d["import_price"])
    dt = d["step_s"] / 3600.0
    bats = d["batteries"]
    mean_import = sum(d["import_price"]) / n
    prob = pulp.LpProblem("plan", pulp.LpMinimize)
    imp_cap = d["import_limit_w"]
    imp = [pulp.LpVariable(f"imp{t}", 0, imp_cap) for t in range(n)]
    exp = [pulp.LpVariable(f"exp{t}", 0, max(d["export_limit_w"], 0.0)) for t in range(n)]
    cur = [pulp.LpVariable(f"cur{t}", 0, d["pv_w"][t]) for t in range(n)]
    c, dis, e, slo, shi = [], [], [], [], []
    for b, bat in enumerate(bats):
        c.append([pulp.LpVariable(f"c{b}_{t}", 0, bat["max_charge_w"]) for t in range(n)])
        dis.append([pulp.LpVariable(f"d{b}_{t}", 0, bat["max_discharge_w"]) for t in range(n)])
        e.append([pulp.LpVariable(f"e{b}_{t}", 0, bat["capacity_wh"]) for t in range(n)])
        slo.append([pulp.LpVariable(f"sl{b}_{t}", 0) for t in range(n)])
        shi.append([pulp.LpVariable(f"sh{b}_{t}", 0) for t in range(n)])
    obj = []
    for t in range(n):
        ep = d["export_price"][t]
        obj.append(d["import_price"][t] * dt / 1000.0 * imp[t])
        obj.append(-ep * dt / 1000.0 * exp[t])
    for b, bat in enumerate(bats):
        term = d["terminal_value_per_kwh"]
        if term is None:
            term = mean_import * bat["discharge_efficiency"]
        for t in range(n):
            obj.append(d["cycling_cost_per_kwh"] * dt / 1000.0 * (c[b][t] + dis[b][t]))
            obj.append(d["soc_penalty_per_kwh"] / 1000.0 * (slo[b][t] + shi[b][t]))
        obj.append(-term / 1000.0 * e[b][n - 1])
    prob += pulp.lpSum(obj)
    for t in range(n):
        prob += imp[t] - exp[t] == d["load_w"][t] - d["pv_w"][t] + cur[t] + pulp.lpSum(
            c[b][t] - dis[b][t] for b in range(len(bats)))
    for b, bat in enumerate(bats):
        floor = max(bat["soc_min_pct"], d["reserve_pct"])
        e0 = bat["capacity_wh"] * bat["soc_pct"] / 100.0
        for t in range(n):
            before = e0 if t == 0 else e[b][t - 1]
            prob += e[b][t] == before + bat["charge_efficiency"] * dt * c[b][t] - dt / bat["discharge_efficiency"] * dis[b][t]
            prob += e[b][t] + slo[b][t] >= bat["capacity_wh"] * floor / 100.0
            prob += e[b][t] - shi[b][t] <= bat["capacity_wh"] * bat["soc_max_pct"] / 100.0
    if milp:
        big = max(d["load_w"]) + sum(b["max_charge_w"] for b in bats) + 1.0
        for t in range(n):
            y = pulp.LpVariable(f"y{t}", cat="Binary")
            prob += imp[t] <= (imp_cap if imp_cap is not None else big) * y
            prob += exp[t] <= max(d["export_limit_w"], 0.0) * (1 - y)
        for b, bat in enumerate(bats):
            for t in range(n):
                z = pulp.LpVariable(f"z{b}_{t}", cat="Binary")
                prob += c[b][t] <= bat["max_charge_w"] * z
                prob += dis[b][t] <= bat["max_discharge_w"] * (1 - z)
    started = time.perf_counter()
    status = prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=300))
    wall = time.perf_counter() - started
    print(json.dumps({
        "status": pulp.LpStatus[status],
        "objective": pulp.value(prob.objective),
        "solve_s": prob.solutionTime,
        "wall_s": wall,
    }))


if __name__ == "__main__":
    main(sys.argv[1], "--milp" in sys.argv[2:])
