//! From the search's flows to the published plan: each class's power shared out over its
//! batteries in proportion to capacity (exact for a class, see `classes`), and every SOC
//! worked out again from the published powers through the efficiencies, so what the plan
//! says a battery does and what it says the battery holds agree.

use std::time::Instant;

use super::classes::{classes, Class};
use super::exact::search;
use super::lp::{pv_on, Flows};
use super::{baseline_cost, BatteryStep, Plan, PlanError, PlanInputs, PlanStep};

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
    for b in &i.batteries {
        let sane = b.capacity_wh > 0.0
            && b.charge_efficiency > 0.0
            && b.charge_efficiency <= 1.0
            && b.discharge_efficiency > 0.0
            && b.discharge_efficiency <= 1.0
            && b.max_charge_w >= 0.0
            && b.max_discharge_w >= 0.0
            && (0.0..=1.0).contains(&b.pv_share);
        if !sane {
            return Err(PlanError::Inputs(format!(
                "battery {}: capacity, efficiencies, power limits or PV share out of range",
                b.id
            )));
        }
    }
    Ok(())
}

/// Solve the plan. Always returns a plan when the inputs are sound; SOC bounds the
/// batteries start outside of are reported in `violations` while they are regained.
pub fn solve(i: &PlanInputs) -> Result<Plan, PlanError> {
    check(i)?;
    let started = Instant::now();
    let cls = classes(i);
    let found = search(i, &cls)?;
    let solve_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (power, ac, soc) = share_out(i, &cls, &found.flows);
    let dt_h = i.step_s / 3600.0;
    let n = i.steps();
    let f = &found.flows;
    let mut cost = 0.0;
    let steps = (0..n)
        .map(|t| {
            let (import, export) = (f.import_w[t], f.export_w[t]);
            cost += (i.import_price[t] * import - i.export_price[t] * export) * dt_h / 1000.0;
            PlanStep {
                start: (i.start + chrono::Duration::seconds((t as f64 * i.step_s) as i64))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                import_price: i.import_price[t],
                export_price: i.export_price[t],
                pv_w: i.pv_w[t],
                pv_source: i.pv_from.get(t).copied(),
                load_w: i.load_w[t],
                grid_w: import - export,
                curtailed_w: f.curtail_site_w[t] + f.curtail_w.iter().map(|c| c[t]).sum::<f64>(),
                batteries: (0..i.batteries.len())
                    .map(|b| BatteryStep {
                        id: i.batteries[b].id.clone(),
                        power_w: power[b][t],
                        ac_w: ac[b][t],
                        soc_pct: soc[b][t],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Plan {
        cost,
        baseline_cost: baseline_cost(i),
        objective: found.objective,
        optimality_gap_pct: (found.objective - found.bound) / found.objective.abs().max(1e-9)
            * 100.0,
        lp_solves: found.lp_solves,
        solve_ms,
        step_s: i.step_s,
        violations: violations(i, &cls, f),
        sources: i.sources.clone(),
        steps,
    })
}

type PerBattery = Vec<Vec<f64>>;

/// Per battery and step: battery power (+ discharge, W), the unit's AC output (W) and SOC at
/// the step's end (%), the SOC following the published power through the efficiencies.
fn share_out(i: &PlanInputs, cls: &[Class], f: &Flows) -> (PerBattery, PerBattery, PerBattery) {
    let n = i.steps();
    let dt_h = i.step_s / 3600.0;
    let mut power = vec![vec![0.0; n]; i.batteries.len()];
    let mut ac = power.clone();
    let mut soc = power.clone();
    for (k, cl) in cls.iter().enumerate() {
        for &b in &cl.members {
            let bat = &i.batteries[b];
            let frac = bat.capacity_wh / cl.cap_wh;
            let mut energy = bat.capacity_wh * bat.soc_pct / 100.0;
            for t in 0..n {
                // What is left of a conflict is under a watt: publish the net.
                let p = (f.discharge_w[k][t] - f.charge_w[k][t]) * frac;
                energy -= if p >= 0.0 {
                    p * dt_h / cl.eta_d
                } else {
                    p * dt_h * cl.eta_c
                };
                energy = energy.clamp(0.0, bat.capacity_wh);
                power[b][t] = p;
                ac[b][t] = p + (pv_on(i, cl, t) - f.curtail_w[k][t]) * frac;
                soc[b][t] = energy / bat.capacity_wh * 100.0;
            }
        }
    }
    (power, ac, soc)
}

fn violations(i: &PlanInputs, cls: &[Class], f: &Flows) -> Vec<String> {
    let mut out = Vec::new();
    for (k, cl) in cls.iter().enumerate() {
        for t in 0..i.steps() {
            let (lo, hi) = (f.below_wh[k][t], f.above_wh[k][t]);
            if (lo > 1.0 || hi > 1.0) && out.len() < 20 {
                out.push(format!(
                    "step {t}: batteries {} {:.0} Wh {} their SOC bounds",
                    cl.members
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
    out
}
