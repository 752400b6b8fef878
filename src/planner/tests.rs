use chrono::TimeZone;

use super::*;

fn battery(id: &str, soc: f64) -> Battery {
    Battery {
        id: id.into(),
        capacity_wh: 10_000.0,
        max_charge_w: 5000.0,
        max_discharge_w: 5000.0,
        charge_efficiency: 0.95,
        discharge_efficiency: 0.95,
        soc_min_pct: 10.0,
        soc_max_pct: 100.0,
        soc_pct: soc,
        rated_w: f64::INFINITY,
        pv_share: 0.0,
    }
}

/// 24 hourly steps, 2 kW of load, no PV, one battery at 50 %.
fn inputs(prices: impl Fn(usize) -> f64) -> PlanInputs {
    let n = 24;
    PlanInputs {
        start: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
        step_s: 3600.0,
        import_price: (0..n).map(&prices).collect(),
        export_price: vec![0.05; n],
        pv_w: vec![0.0; n],
        load_w: vec![2000.0; n],
        batteries: vec![battery("b1", 50.0)],
        export_limit_w: 10_000.0,
        import_limit_w: None,
        dr_limits_w: Vec::new(),
        reserve_pct: 0.0,
        cycling_cost_per_kwh: 0.005,
        soc_penalty_per_kwh: 10.0,
        terminal_value_per_kwh: None,
        time_limit_s: 10.0,
        pv_from: Vec::new(),
        sources: Sources {
            import_price: "test".into(),
            export_price: "test".into(),
            pv: "test".into(),
            load: "test".into(),
        },
    }
}

fn powers(p: &Plan) -> Vec<f64> {
    p.steps.iter().map(|s| s.batteries[0].power_w).collect()
}

#[test]
fn flat_prices_mean_no_cycling() {
    let p = solve(&inputs(|_| 0.25)).unwrap();
    let moved: f64 = powers(&p).iter().map(|w| w.abs()).sum();
    assert!(
        moved < 1.0,
        "no charge or discharge at flat prices: {:?}",
        powers(&p)
    );
    assert!(p.violations.is_empty());
    assert!((p.cost - p.baseline_cost).abs() < 1e-3);
}

#[test]
fn cheap_block_charges_and_dear_block_discharges_within_limits() {
    // Cheap 00:00–04:00, dear 17:00–21:00.
    let price = |t: usize| {
        if t < 4 {
            0.10
        } else if (17..21).contains(&t) {
            0.40
        } else {
            0.25
        }
    };
    let p = solve(&inputs(price)).unwrap();
    let w = powers(&p);
    assert!(
        w[..4].iter().all(|&x| x < -100.0),
        "charges while cheap: {w:?}"
    );
    assert!(
        w[17..21].iter().all(|&x| x > 100.0),
        "discharges while dear: {w:?}"
    );
    assert!(
        w.iter()
            .all(|&x| (-5000.0 - 1e-6..=5000.0 + 1e-6).contains(&x)),
        "power limits"
    );
    for s in &p.steps {
        let soc = s.batteries[0].soc_pct;
        assert!(
            (10.0 - 1e-6..=100.0 + 1e-6).contains(&soc),
            "SOC bounds: {soc}"
        );
        // The site never exports: discharge covers at most the load.
        assert!(s.grid_w >= -1.0, "{}", s.grid_w);
    }
    // Energy bookkeeping with efficiency: what went in, times both efficiencies, bounds
    // what came out (plus what was there at the start above the floor).
    let charged: f64 = w.iter().filter(|&&x| x < 0.0).map(|x| -x).sum::<f64>();
    let discharged: f64 = w.iter().filter(|&&x| x > 0.0).sum::<f64>();
    let start_wh = 10_000.0 * (0.50 - 0.10);
    assert!(discharged <= (charged * 0.95 + start_wh) * 0.95 + 1.0);
    assert!(
        p.cost < p.baseline_cost - 1.0,
        "saves money: {} vs {}",
        p.cost,
        p.baseline_cost
    );
}

#[test]
fn negative_prices_charge_and_curtail_export() {
    let mut i = inputs(|t| if (10..14).contains(&t) { -0.05 } else { 0.25 });
    i.batteries[0].soc_pct = 10.0;
    i.pv_w = (0..24)
        .map(|t| if (9..15).contains(&t) { 6000.0 } else { 0.0 })
        .collect();
    i.export_price = (0..24)
        .map(|t| if (10..14).contains(&t) { -0.10 } else { 0.05 })
        .collect();
    let p = solve(&i).unwrap();
    for s in &p.steps[10..14] {
        assert!(
            s.grid_w >= -1.0,
            "no export at a negative export price: {}",
            s.grid_w
        );
    }
    let charged_when_negative = p.steps[10..14]
        .iter()
        .any(|s| s.batteries[0].power_w < -100.0);
    assert!(charged_when_negative);
    let curtailed: f64 = p.steps[10..14].iter().map(|s| s.curtailed_w).sum();
    assert!(
        curtailed > 100.0,
        "surplus PV curtailed rather than exported: {curtailed}"
    );
}

#[test]
fn zero_export_limit_never_plans_export() {
    let mut i = inputs(|t| if t >= 18 { 0.50 } else { 0.20 });
    i.export_limit_w = 0.0;
    i.export_price = vec![0.45; 24];
    i.batteries[0].soc_pct = 100.0;
    i.pv_w = (0..24)
        .map(|t| if (8..16).contains(&t) { 8000.0 } else { 0.0 })
        .collect();
    let p = solve(&i).unwrap();
    for s in &p.steps {
        assert!(s.grid_w >= -1e-3, "export planned: {}", s.grid_w);
    }
}

#[test]
fn infeasible_soc_bounds_give_a_plan_with_the_violation_reported() {
    let mut i = inputs(|_| 0.25);
    // Starts far below its floor and can only charge slowly.
    i.batteries[0].soc_min_pct = 90.0;
    i.batteries[0].soc_pct = 5.0;
    i.batteries[0].max_charge_w = 200.0;
    let p = solve(&i).expect("a plan, not an error");
    assert!(!p.violations.is_empty());
    assert!(p.violations[0].contains("below"), "{:?}", p.violations);
    // It charges as fast as it can to get back inside.
    assert!(powers(&p)[0] < -150.0, "{:?}", powers(&p));
}

#[test]
fn batteries_of_one_kind_are_shared_by_room_and_never_cross_charge() {
    let mut i = inputs(|t| {
        if t < 4 {
            0.10
        } else if (17..21).contains(&t) {
            0.40
        } else {
            0.25
        }
    });
    i.batteries = vec![battery("a", 20.0), battery("b", 80.0)];
    let p = solve(&i).unwrap();
    for s in &p.steps {
        let (a, b) = (s.batteries[0].power_w, s.batteries[1].power_w);
        assert!(a * b >= -1e-6, "one charging from the other: {a} {b}");
        for bat in &s.batteries {
            assert!((10.0 - 1e-6..=100.0 + 1e-6).contains(&bat.soc_pct));
        }
    }
}

/// Dynamic programming over a fine SOC grid: an independent optimum for one battery.
fn dp_objective(i: &PlanInputs, grid_wh: f64) -> f64 {
    let b = &i.batteries[0];
    let dt_h = i.step_s / 3600.0;
    let e_min = b.capacity_wh * b.soc_min_pct / 100.0;
    let e_max = b.capacity_wh * b.soc_max_pct / 100.0;
    let levels = ((e_max - e_min) / grid_wh).round() as usize + 1;
    let energy = |l: usize| e_min + l as f64 * grid_wh;
    let start = ((b.capacity_wh * b.soc_pct / 100.0 - e_min) / grid_wh).round() as usize;
    let terminal = i
        .terminal_value_per_kwh
        .unwrap_or(i.import_price.iter().sum::<f64>() / i.steps() as f64 * b.discharge_efficiency);
    let mut best = vec![f64::INFINITY; levels];
    best[start] = 0.0;
    for t in 0..i.steps() {
        let mut next = vec![f64::INFINITY; levels];
        for (l, &so_far) in best.iter().enumerate() {
            if !so_far.is_finite() {
                continue;
            }
            for (m, slot) in next.iter_mut().enumerate() {
                let delta = energy(m) - energy(l);
                let (charge, discharge) = if delta >= 0.0 {
                    (delta / b.charge_efficiency / dt_h, 0.0)
                } else {
                    (0.0, -delta * b.discharge_efficiency / dt_h)
                };
                if charge > b.max_charge_w + 1e-9 || discharge > b.max_discharge_w + 1e-9 {
                    continue;
                }
                let mut grid = i.load_w[t] - i.pv_w[t] + charge - discharge;
                if grid < 0.0 {
                    grid = -(-grid).min(i.export_limit_w);
                }
                let energy_cost = if grid >= 0.0 {
                    i.import_price[t] * grid
                } else {
                    i.export_price[t] * grid
                } * dt_h
                    / 1000.0;
                let cycling = i.cycling_cost_per_kwh * (charge + discharge) * dt_h / 1000.0;
                let total = so_far + energy_cost + cycling;
                if total < *slot {
                    *slot = total;
                }
            }
        }
        best = next;
    }
    (0..levels)
        .map(|l| best[l] - terminal * energy(l) / 1000.0)
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn lp_agrees_with_dynamic_programming_within_half_a_percent() {
    let cases: Vec<Box<dyn Fn(usize) -> f64>> = vec![
        Box::new(|t| {
            if t < 4 {
                0.10
            } else if (17..21).contains(&t) {
                0.40
            } else {
                0.25
            }
        }),
        Box::new(|t| 0.2 + 0.15 * ((t as f64) / 24.0 * std::f64::consts::TAU).sin()),
        Box::new(|t| if t % 6 < 2 { 0.05 } else { 0.30 }),
    ];
    for (k, price) in cases.iter().enumerate() {
        let mut i = inputs(price);
        i.pv_w = (0..24)
            .map(|t| if (9..16).contains(&t) { 3000.0 } else { 0.0 })
            .collect();
        let lp = solve(&i).unwrap().objective;
        let dp = dp_objective(&i, 25.0);
        let gap = (lp - dp).abs() / dp.abs().max(1e-9);
        assert!(
            gap <= 0.005,
            "case {k}: LP {lp:.4} vs DP {dp:.4} ({:.3} %)",
            gap * 100.0
        );
        assert!(lp <= dp + 1e-6, "case {k}: the LP is the tighter optimum");
    }
}

#[test]
fn demand_response_limits_hold_in_their_steps_only() {
    let mut i = inputs(|_| 0.20);
    i.export_price = vec![0.15; 24];
    i.batteries[0].soc_pct = 100.0;
    i.pv_w = (0..24)
        .map(|t| if (8..16).contains(&t) { 8000.0 } else { 0.0 })
        .collect();
    // An event holds export to zero from 10:00 to 13:00.
    i.dr_limits_w = (0..24)
        .map(|t| ((10..13).contains(&t).then_some(0.0), None))
        .collect();
    let p = solve(&i).unwrap();
    for (t, s) in p.steps.iter().enumerate() {
        if (10..13).contains(&t) {
            assert!(
                s.grid_w >= -1e-3,
                "step {t} exports under the event: {}",
                s.grid_w
            );
        }
    }
    assert!(
        p.steps[14].grid_w < -1000.0,
        "exports again after the event: {}",
        p.steps[14].grid_w
    );
}
