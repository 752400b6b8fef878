//! Plans a fleet can execute, checked against optima computed another way: dynamic
//! programming over SOC for one battery (written here), and a MILP solved by SciPy's HiGHS
//! (tests/reference/plan_milp.py) for a mixed fleet — on days with negative prices and with
//! export paying more than import, where the LP relaxation alone promises more than any
//! fleet can earn.

#![cfg(feature = "sim")]

mod common;

use chrono::{TimeZone, Utc};
use serde_json::json;
use site_ems::planner::{solve, Battery, Plan, PlanInputs, Sources};

#[allow(clippy::too_many_arguments)]
fn battery(
    id: &str,
    capacity_wh: f64,
    (eta_c, eta_d): (f64, f64),
    (max_c, max_d): (f64, f64),
    soc_pct: f64,
    rated_w: f64,
    pv_share: f64,
) -> Battery {
    Battery {
        id: id.into(),
        capacity_wh,
        max_charge_w: max_c,
        max_discharge_w: max_d,
        charge_efficiency: eta_c,
        discharge_efficiency: eta_d,
        soc_min_pct: 10.0,
        soc_max_pct: 100.0,
        soc_pct,
        rated_w,
        pv_share,
    }
}

fn day(steps: usize, batteries: Vec<Battery>) -> PlanInputs {
    PlanInputs {
        start: Utc.with_ymd_and_hms(2026, 5, 10, 0, 0, 0).unwrap(),
        step_s: 86_400.0 / steps as f64,
        import_price: Vec::new(),
        export_price: Vec::new(),
        pv_w: Vec::new(),
        load_w: Vec::new(),
        batteries,
        export_limit_w: 4000.0,
        import_limit_w: None,
        dr_limits_w: Vec::new(),
        reserve_pct: 0.0,
        cycling_cost_per_kwh: 0.0,
        soc_penalty_per_kwh: 10.0,
        terminal_value_per_kwh: Some(0.0),
        time_limit_s: 30.0,
        pv_from: Vec::new(),
        sources: Sources {
            import_price: "test".into(),
            export_price: "test".into(),
            pv: "test".into(),
            load: "test".into(),
        },
    }
}

/// Hour of day of step `t`.
fn hour(i: &PlanInputs, t: usize) -> f64 {
    t as f64 * i.step_s / 3600.0
}

/// Night rate, evening peak, and a sunny midday when import prices go negative.
fn negative_midday(mut i: PlanInputs, pv_peak_w: f64, load_scale: f64) -> PlanInputs {
    for t in 0..(86_400.0 / i.step_s) as usize {
        let h = hour(&i, t);
        let (imp, exp) = match h {
            h if h < 6.0 => (0.10, 0.05),
            h if (10.0..11.0).contains(&h) => (-0.08, -0.03),
            h if (11.0..12.0).contains(&h) => (-0.12, -0.03),
            h if (12.0..13.0).contains(&h) => (-0.10, -0.03),
            h if (13.0..14.0).contains(&h) => (-0.05, -0.03),
            h if (17.0..21.0).contains(&h) => (0.40, 0.05),
            _ => (0.25, 0.05),
        };
        i.import_price.push(imp);
        i.export_price.push(exp);
        let sun = ((h.floor() - 7.0) / 10.0 * std::f64::consts::PI)
            .sin()
            .max(0.0);
        // Whole kW, so an SOC grid of 10 Wh holds the optimum's energies exactly.
        i.pv_w.push((pv_peak_w * sun / 1000.0).round() * 1000.0);
        let load = match h {
            h if !(6.0..22.0).contains(&h) => 1000.0,
            h if h >= 17.0 => 3000.0,
            _ => 2000.0,
        };
        i.load_w.push(load * load_scale);
    }
    i
}

fn grid_cost(i: &PlanInputs, t: usize, grid_w: f64) -> f64 {
    let price = if grid_w >= 0.0 {
        i.import_price[t]
    } else {
        i.export_price[t]
    };
    price * grid_w * i.step_s / 3600.0 / 1000.0
}

/// What a fleet can carry out: powers within limits, each unit within its AC rating, the
/// energy balance met, SOC following the published powers through the efficiencies, and a
/// reported cost that is what the grid flows cost (so no hidden import and export at once).
fn assert_executable(i: &PlanInputs, p: &Plan) {
    let dt_h = i.step_s / 3600.0;
    let mut cost = 0.0;
    let mut soc: Vec<f64> = i.batteries.iter().map(|b| b.soc_pct).collect();
    for (t, s) in p.steps.iter().enumerate() {
        let battery_w: f64 = s.batteries.iter().map(|b| b.power_w).sum();
        let net = i.load_w[t] - i.pv_w[t] + s.curtailed_w - battery_w;
        assert!(
            (s.grid_w - net).abs() < 1.0,
            "step {t}: grid {} ≠ net load {net}",
            s.grid_w
        );
        assert!(
            s.curtailed_w > -0.5 && s.curtailed_w <= i.pv_w[t] + 0.5,
            "step {t}"
        );
        assert!(
            s.grid_w >= -i.export_cap_w(t) - 1.0,
            "step {t}: export over the limit"
        );
        if let Some(cap) = i.import_cap_w(t) {
            assert!(s.grid_w <= cap + 1.0, "step {t}: import over the limit");
        }
        cost += grid_cost(i, t, s.grid_w);
        for (k, (b, bs)) in i.batteries.iter().zip(&s.batteries).enumerate() {
            let w = bs.power_w;
            assert!(
                w >= -b.max_charge_w - 0.5 && w <= b.max_discharge_w + 0.5,
                "step {t} {}: {w} W",
                b.id
            );
            let stored_wh = if w >= 0.0 {
                -w * dt_h / b.discharge_efficiency
            } else {
                -w * dt_h * b.charge_efficiency
            };
            soc[k] += stored_wh / b.capacity_wh * 100.0;
            assert!(
                (bs.soc_pct - soc[k]).abs() <= 0.05,
                "step {t} {}: SOC {} but the powers give {}",
                b.id,
                bs.soc_pct,
                soc[k]
            );
            soc[k] = bs.soc_pct;
            assert!(
                bs.soc_pct >= b.soc_min_pct - 0.05 && bs.soc_pct <= b.soc_max_pct + 0.05,
                "step {t} {}: SOC {}",
                b.id,
                bs.soc_pct
            );
            assert!(
                bs.ac_w.abs() <= b.rated_w + 0.5,
                "step {t} {}: {} W AC on a {} W unit",
                b.id,
                bs.ac_w,
                b.rated_w
            );
            let own_pv = bs.ac_w - w;
            assert!(
                own_pv > -0.5 && own_pv <= b.pv_share * i.pv_w[t] + 0.5,
                "step {t} {}: PV {own_pv}",
                b.id
            );
        }
    }
    assert!(
        (cost - p.cost).abs() < 1e-6,
        "reported cost {} but the grid flows cost {cost}",
        p.cost
    );
}

/// One battery, DP over SOC in 10 Wh levels; each step picks the best curtailment and
/// grid flow for the battery's energy change.
fn dp_optimum(i: &PlanInputs) -> f64 {
    let b = &i.batteries[0];
    let dt_h = i.step_s / 3600.0;
    let grid_wh = 10.0;
    let lo = b.capacity_wh * b.soc_min_pct / 100.0;
    let hi = b.capacity_wh * b.soc_max_pct / 100.0;
    let levels = ((hi - lo) / grid_wh).round() as usize + 1;
    let energy = |l: usize| lo + l as f64 * grid_wh;
    let start = ((b.capacity_wh * b.soc_pct / 100.0 - lo) / grid_wh).round() as usize;
    let mut best = vec![f64::INFINITY; levels];
    best[start] = 0.0;
    for t in 0..i.steps() {
        let mut next = vec![f64::INFINITY; levels];
        for (l, &so_far) in best.iter().enumerate() {
            if !so_far.is_finite() {
                continue;
            }
            for (m, slot) in next.iter_mut().enumerate() {
                let stored = energy(m) - energy(l);
                // AC power into the battery (+ charge).
                let into = if stored >= 0.0 {
                    stored / b.charge_efficiency / dt_h
                } else {
                    stored * b.discharge_efficiency / dt_h
                };
                if into > b.max_charge_w + 1e-6 || -into > b.max_discharge_w + 1e-6 {
                    continue;
                }
                if let Some(c) = step_cost(i, t, into) {
                    *slot = slot.min(so_far + c);
                }
            }
        }
        best = next;
    }
    best.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The cheapest grid flow for a step, choosing how much PV to curtail; `None` if the export
/// limit cannot be met.
fn step_cost(i: &PlanInputs, t: usize, battery_in_w: f64) -> Option<f64> {
    let base = i.load_w[t] - i.pv_w[t] + battery_in_w;
    let cur_lo = (-i.export_limit_w - base).max(0.0);
    if cur_lo > i.pv_w[t] {
        return None;
    }
    // Cost is piecewise linear in the curtailment: its ends and the kink at zero grid flow.
    [cur_lo, i.pv_w[t], (-base).clamp(cur_lo, i.pv_w[t])]
        .iter()
        .map(|cur| grid_cost(i, t, base + cur))
        .reduce(f64::min)
}

/// The MILP optimum from SciPy's HiGHS.
fn milp_optimum(i: &PlanInputs) -> (f64, f64) {
    let input = json!({
        "step_s": i.step_s,
        "import_price": i.import_price,
        "export_price": i.export_price,
        "pv_w": i.pv_w,
        "load_w": i.load_w,
        "batteries": i.batteries.iter().map(|b| json!({
            "capacity_wh": b.capacity_wh,
            "max_charge_w": b.max_charge_w,
            "max_discharge_w": b.max_discharge_w,
            "charge_efficiency": b.charge_efficiency,
            "discharge_efficiency": b.discharge_efficiency,
            "soc_min_pct": b.soc_min_pct,
            "soc_max_pct": b.soc_max_pct,
            "soc_pct": b.soc_pct,
            "rated_w": b.rated_w.is_finite().then_some(b.rated_w),
            "pv_share": b.pv_share,
        })).collect::<Vec<_>>(),
        "export_limit_w": i.export_limit_w,
        "import_limit_w": i.import_limit_w,
        "reserve_pct": i.reserve_pct,
        "cycling_cost_per_kwh": i.cycling_cost_per_kwh,
        "terminal_value_per_kwh": i.terminal_value_per_kwh,
    });
    let v = common::reference::answer(
        std::path::Path::new(common::reference::DEBIAN_PYTHON),
        "tests/reference/plan_milp.py",
        &input,
    );
    (
        v["objective"].as_f64().expect("a MILP optimum"),
        v["cost"].as_f64().unwrap(),
    )
}

fn within_a_tenth_of_a_percent(what: &str, plan: f64, optimum: f64) {
    let gap = (plan - optimum) / optimum.abs().max(1e-9);
    println!(
        "{what}: plan {plan:.6}, optimum {optimum:.6}, gap {:.4} %",
        gap * 100.0
    );
    assert!(
        gap.abs() <= 0.001,
        "{what}: plan {plan} vs optimum {optimum}"
    );
}

#[test]
fn negative_price_day_one_battery_matches_dynamic_programming() {
    let i = negative_midday(
        day(
            24,
            vec![battery(
                "b",
                10_000.0,
                (0.9, 0.8),
                (5000.0, 4000.0),
                50.0,
                f64::INFINITY,
                0.0,
            )],
        ),
        6000.0,
        1.0,
    );
    let p = solved(&i);
    assert!(
        p.lp_solves > 1,
        "the LP alone was executable: not the case under test"
    );
    within_a_tenth_of_a_percent("one battery vs DP", p.cost, dp_optimum(&i));
    within_a_tenth_of_a_percent("one battery vs MILP", p.objective, milp_optimum(&i).0);
}

/// The plan for `i`, checked executable, with its search figures printed.
fn solved(i: &PlanInputs) -> Plan {
    let p = solve(i).unwrap();
    println!(
        "{} LP solves in {:.0} ms, gap proven {:.4} %",
        p.lp_solves, p.solve_ms, p.optimality_gap_pct
    );
    assert_executable(i, &p);
    p
}

/// The mixed fleet of three on a negative-price day, with export and import limits.
fn mixed_day() -> PlanInputs {
    let mut i = negative_midday(day(96, mixed_three()), 14_000.0, 1.5);
    i.export_limit_w = 5000.0;
    i.import_limit_w = Some(15_000.0);
    i
}

fn mixed_three() -> Vec<Battery> {
    vec![
        battery(
            "a",
            10_000.0,
            (0.95, 0.95),
            (5000.0, 5000.0),
            50.0,
            8000.0,
            0.3,
        ),
        battery(
            "b",
            6500.0,
            (0.92, 0.94),
            (3000.0, 3500.0),
            30.0,
            5000.0,
            0.2,
        ),
        battery(
            "c",
            13_500.0,
            (0.96, 0.90),
            (5000.0, 5000.0),
            80.0,
            6000.0,
            0.4,
        ),
    ]
}

#[test]
fn negative_price_day_mixed_fleet_matches_a_milp() {
    let i = mixed_day();
    let p = solved(&i);
    assert!(
        p.lp_solves > 1,
        "the LP alone was executable: not the case under test"
    );
    within_a_tenth_of_a_percent("mixed fleet vs MILP", p.objective, milp_optimum(&i).0);
}

/// Export pays more than import in the evening: the relaxation would import to export.
#[test]
fn export_above_import_prices_mixed_fleet_matches_a_milp() {
    let mut i = mixed_day();
    for t in 0..i.steps() {
        let h = hour(&i, t);
        if (17.0..21.0).contains(&h) {
            i.import_price[t] = 0.20;
            i.export_price[t] = 0.30;
        } else if i.import_price[t] < 0.0 {
            i.import_price[t] = 0.08;
            i.export_price[t] = 0.10;
        }
    }
    let p = solved(&i);
    let (objective, cost) = milp_optimum(&i);
    within_a_tenth_of_a_percent("export > import vs MILP", p.objective, objective);
    println!("costs: plan {:.4}, MILP {cost:.4}", p.cost);
}

/// A hybrid whose PV alone nearly fills its rating cannot also discharge at full power.
#[test]
fn hybrids_stay_within_their_ac_rating() {
    let mut i = negative_midday(day(96, mixed_three()), 14_000.0, 1.5);
    // Dear all day long: the batteries want to discharge into the export limit at noon too.
    for t in 0..i.steps() {
        i.import_price[t] = 0.30;
        i.export_price[t] = if (11.0..14.0).contains(&hour(&i, t)) {
            0.35
        } else {
            0.05
        };
    }
    i.export_limit_w = 20_000.0;
    let p = solved(&i);
    let at_rating = p
        .steps
        .iter()
        .flat_map(|s| s.batteries.iter().zip(&i.batteries))
        .filter(|(bs, b)| bs.ac_w >= b.rated_w - 1.0)
        .count();
    assert!(
        at_rating > 0,
        "no unit reached its rating: the rating was never tested"
    );
}
