//! The LP, built with good_lp and solved with Clarabel.

use std::time::Instant;

use good_lp::{variable, variables, Expression, ResolutionError, Solution, SolverModel, Variable};

#[cfg(not(feature = "solver-clarabel"))]
compile_error!("the planner needs an LP solver: enable the `solver-clarabel` feature");

/// The solver behind the planner, chosen by Cargo feature, with its time limit set.
#[cfg(feature = "solver-clarabel")]
fn solver(
    vars: good_lp::ProblemVariables,
    objective: Expression,
    time_limit_s: f64,
) -> good_lp::solvers::clarabel::ClarabelProblem {
    let mut problem = vars
        .minimise(objective)
        .using(good_lp::solvers::clarabel::clarabel);
    problem.settings().time_limit(time_limit_s);
    problem
}

use super::{baseline_cost, BatteryStep, Plan, PlanError, PlanInputs, PlanStep};

/// The LP works in kW and kWh: watts against prices per kWh spread the coefficients over
/// nine orders of magnitude, which an interior-point solver resolves poorly.
const K: f64 = 1000.0;

/// Batteries with the same efficiencies, solved as one.
struct Group {
    members: Vec<usize>,
    eta_c: f64,
    eta_d: f64,
    cap_wh: f64,
    max_c: f64,
    max_d: f64,
    e0: f64,
    e_min: f64,
    e_max: f64,
}

fn groups(i: &PlanInputs) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for (k, b) in i.batteries.iter().enumerate() {
        let floor = b.soc_min_pct.max(i.reserve_pct);
        let g = match out
            .iter_mut()
            .find(|g| g.eta_c == b.charge_efficiency && g.eta_d == b.discharge_efficiency)
        {
            Some(g) => g,
            None => {
                out.push(Group {
                    members: Vec::new(),
                    eta_c: b.charge_efficiency,
                    eta_d: b.discharge_efficiency,
                    cap_wh: 0.0,
                    max_c: 0.0,
                    max_d: 0.0,
                    e0: 0.0,
                    e_min: 0.0,
                    e_max: 0.0,
                });
                out.last_mut().expect("just pushed")
            }
        };
        g.members.push(k);
        g.cap_wh += b.capacity_wh;
        g.max_c += b.max_charge_w;
        g.max_d += b.max_discharge_w;
        g.e0 += b.capacity_wh * b.soc_pct / 100.0;
        g.e_min += b.capacity_wh * floor / 100.0;
        g.e_max += b.capacity_wh * b.soc_max_pct / 100.0;
    }
    out
}

fn check(i: &PlanInputs) -> Result<(), PlanError> {
    let n = i.steps();
    if n == 0 {
        return Err(PlanError::Inputs("no steps".into()));
    }
    for (name, v) in [
        ("export price", &i.export_price),
        ("PV", &i.pv_w),
        ("load", &i.load_w),
    ] {
        if v.len() != n {
            return Err(PlanError::Inputs(format!(
                "{name} has {} values for {n} steps",
                v.len()
            )));
        }
    }
    let all = i
        .import_price
        .iter()
        .chain(&i.export_price)
        .chain(&i.pv_w)
        .chain(&i.load_w);
    if all.clone().any(|x| !x.is_finite()) {
        return Err(PlanError::Inputs(
            "a price or forecast is not a number".into(),
        ));
    }
    Ok(())
}

/// Solve the plan. Always returns a plan when the inputs are sound; SOC bounds that cannot
/// be kept are reported in `violations`.
pub fn solve(i: &PlanInputs) -> Result<Plan, PlanError> {
    check(i)?;
    let started = Instant::now();
    let n = i.steps();
    let dt_h = i.step_s / 3600.0;
    let gs = groups(i);
    let mean_import = i.import_price.iter().sum::<f64>() / n as f64;

    let mut vars = variables!();
    let imp: Vec<Variable> = (0..n)
        .map(|t| {
            let cap = i.import_cap_w(t).map_or(f64::INFINITY, |w| w / K);
            vars.add(variable().min(0.0).max(cap))
        })
        .collect();
    let exp: Vec<Variable> = (0..n)
        .map(|t| vars.add(variable().min(0.0).max(i.export_cap_w(t) / K)))
        .collect();
    let cur: Vec<Variable> = (0..n)
        .map(|t| vars.add(variable().min(0.0).max(i.pv_w[t] / K)))
        .collect();
    let mut c = Vec::new();
    let mut d = Vec::new();
    let mut e = Vec::new();
    let mut slack_lo = Vec::new();
    let mut slack_hi = Vec::new();
    for g in &gs {
        c.push(
            (0..n)
                .map(|_| vars.add(variable().min(0.0).max(g.max_c / K)))
                .collect::<Vec<_>>(),
        );
        d.push(
            (0..n)
                .map(|_| vars.add(variable().min(0.0).max(g.max_d / K)))
                .collect::<Vec<_>>(),
        );
        e.push(
            (0..n)
                .map(|_| vars.add(variable().min(0.0).max(g.cap_wh / K)))
                .collect::<Vec<_>>(),
        );
        slack_lo.push(
            (0..n)
                .map(|_| vars.add(variable().min(0.0)))
                .collect::<Vec<_>>(),
        );
        slack_hi.push(
            (0..n)
                .map(|_| vars.add(variable().min(0.0)))
                .collect::<Vec<_>>(),
        );
    }

    let mut objective = Expression::from(0.0);
    for t in 0..n {
        // Exporting is never worth more than importing: no buying to sell in the same step.
        let export_price = i.export_price[t].min(i.import_price[t]);
        objective += (i.import_price[t] * dt_h) * imp[t];
        objective -= (export_price * dt_h) * exp[t];
    }
    for (k, g) in gs.iter().enumerate() {
        let terminal = i.terminal_value_per_kwh.unwrap_or(mean_import * g.eta_d);
        for t in 0..n {
            objective += (i.cycling_cost_per_kwh * dt_h) * (c[k][t] + d[k][t]);
            objective += i.soc_penalty_per_kwh * (slack_lo[k][t] + slack_hi[k][t]);
        }
        objective -= terminal * e[k][n - 1];
    }

    let mut problem = solver(vars, objective.clone(), i.time_limit_s);
    for t in 0..n {
        let mut battery = Expression::from(0.0);
        for k in 0..gs.len() {
            battery += c[k][t] - d[k][t];
        }
        problem =
            problem.with((imp[t] - exp[t]).eq((i.load_w[t] - i.pv_w[t]) / K + cur[t] + battery));
    }
    for (k, g) in gs.iter().enumerate() {
        for t in 0..n {
            let before: Expression = if t == 0 {
                Expression::from(g.e0 / K)
            } else {
                e[k][t - 1].into()
            };
            let flow = (g.eta_c * dt_h) * c[k][t] - (dt_h / g.eta_d) * d[k][t];
            problem = problem
                .with((e[k][t] - before - flow).eq(0.0))
                .with((e[k][t] + slack_lo[k][t]).geq(g.e_min / K))
                .with((e[k][t] - slack_hi[k][t]).leq(g.e_max / K));
        }
    }

    let solution = problem.solve().map_err(|err| match err {
        // good_lp's wording for Clarabel's MaxTime status.
        ResolutionError::Other("Time limit reached") => PlanError::Timeout(i.time_limit_s),
        other => PlanError::Solver(other.to_string()),
    })?;
    let solve_ms = started.elapsed().as_secs_f64() * 1000.0;
    if started.elapsed().as_secs_f64() > i.time_limit_s {
        return Err(PlanError::Timeout(i.time_limit_s));
    }

    // Share each group's power among its batteries, step by step.
    let nb = i.batteries.len();
    let mut power = vec![vec![0.0; n]; nb];
    let mut soc = vec![vec![0.0; n]; nb];
    let mut violations = Vec::new();
    for (k, g) in gs.iter().enumerate() {
        let mut energy: Vec<f64> = g
            .members
            .iter()
            .map(|&b| i.batteries[b].capacity_wh * i.batteries[b].soc_pct / 100.0)
            .collect();
        for t in 0..n {
            let net = (solution.value(d[k][t]) - solution.value(c[k][t])) * K;
            let rooms: Vec<f64> = g
                .members
                .iter()
                .zip(&energy)
                .map(|(&b, &en)| {
                    let bat = &i.batteries[b];
                    if net >= 0.0 {
                        let above = (en
                            - bat.capacity_wh * bat.soc_min_pct.max(i.reserve_pct) / 100.0)
                            .max(0.0);
                        bat.max_discharge_w.min(above * g.eta_d / dt_h)
                    } else {
                        let below = (bat.capacity_wh * bat.soc_max_pct / 100.0 - en).max(0.0);
                        bat.max_charge_w.min(below / g.eta_c / dt_h)
                    }
                })
                .collect();
            let total_room: f64 = rooms.iter().sum();
            for (m, &b) in g.members.iter().enumerate() {
                let share = if total_room > 1e-9 {
                    net * rooms[m] / total_room
                } else {
                    // No room left anywhere inside the bounds: share by capacity.
                    net * i.batteries[b].capacity_wh / g.cap_wh.max(1e-9)
                };
                let flow_wh = if share >= 0.0 {
                    -share * dt_h / g.eta_d
                } else {
                    -share * dt_h * g.eta_c
                };
                energy[m] = (energy[m] + flow_wh).clamp(0.0, i.batteries[b].capacity_wh);
                power[b][t] = share;
                soc[b][t] = energy[m] / i.batteries[b].capacity_wh.max(1e-9) * 100.0;
            }
            let lo = solution.value(slack_lo[k][t]) * K;
            let hi = solution.value(slack_hi[k][t]) * K;
            if (lo > 1.0 || hi > 1.0) && violations.len() < 20 {
                violations.push(format!(
                    "step {t}: batteries {} {:.0} Wh {} their SOC bounds",
                    g.members
                        .iter()
                        .map(|&b| i.batteries[b].id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    lo.max(hi),
                    if lo > hi { "below" } else { "above" }
                ));
            }
        }
    }

    let mut cost = 0.0;
    let steps = (0..n)
        .map(|t| {
            let (import, export) = (solution.value(imp[t]) * K, solution.value(exp[t]) * K);
            let grid = import - export;
            cost += (i.import_price[t] * import - i.export_price[t] * export) * dt_h / 1000.0;
            PlanStep {
                start: (i.start + chrono::Duration::seconds((t as f64 * i.step_s) as i64))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                import_price: i.import_price[t],
                export_price: i.export_price[t],
                pv_w: i.pv_w[t],
                load_w: i.load_w[t],
                grid_w: grid,
                curtailed_w: solution.value(cur[t]) * K,
                batteries: (0..nb)
                    .map(|b| BatteryStep {
                        id: i.batteries[b].id.clone(),
                        power_w: power[b][t],
                        soc_pct: soc[b][t],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Plan {
        cost,
        baseline_cost: baseline_cost(i),
        objective: solution.eval(&objective),
        solve_ms,
        step_s: i.step_s,
        violations,
        sources: i.sources.clone(),
        steps,
    })
}
