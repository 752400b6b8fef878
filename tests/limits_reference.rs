//! The guard's curtailment on mixed fleets against an optimum found independently: SciPy's
//! HiGHS solving the physics of the same snapshot (`tests/reference/curtailment_lp.py`,
//! Debian's python3-scipy, installed by `.ci/run`).
//!
//! Random sites of single- and three-phase units with unbalanced loads, per-phase export
//! limits and, on half of them, per-phase import limits: where the limits can all be met,
//! `control::step` must meet them and curtail no more than 1 % above the optimum.

#![cfg(feature = "sim")]

mod common;

use chrono::{TimeZone, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use site_ems::config::{ConflictPriority, Phase, WorkingMode};
use site_ems::control::params::ModeParams;
use site_ems::control::{
    step, Constraints, ControlParams, ControlState, GridLimit, GridReading, Snapshot, UnitHealth,
    UnitInput, UnitParams, UnitReading,
};

/// The reference runs on Debian's Python, where python3-scipy installs.
const MARGIN_W: f64 = 50.0;

struct Site {
    params: ControlParams,
    snapshot: Snapshot,
    /// The snapshot as the reference reads it.
    reference: Value,
    export_w: f64,
    import_w: Option<f64>,
}

fn random_site(rng: &mut SmallRng) -> Site {
    let n = rng.random_range(3..=10);
    let mut units = Vec::new();
    let mut readings = Vec::new();
    let mut described = Vec::new();
    let loads_w: [f64; 3] = std::array::from_fn(|_| rng.random_range(0.0..8_000.0));
    let mut net_w = loads_w;
    let mut grid_w = loads_w;
    for k in 0..n {
        let rated_w = rng.random_range(3_000.0..12_000.0f64).round();
        let phases = if rng.random_bool(0.5) {
            Phase::ALL.to_vec()
        } else {
            vec![Phase::ALL[rng.random_range(0..3)]]
        };
        let battery_max_w = (rated_w * rng.random_range(0.3..1.0)).round();
        // A third of the batteries are full, a few empty: surplus PV must then be curtailed.
        let soc = match rng.random_range(0..6) {
            0 | 1 => 100.0,
            2 => 5.0,
            _ => rng.random_range(20.0..90.0),
        };
        let pv_w = (rated_w * rng.random_range(0.2..1.0)).round();
        let ac = pv_w / phases.len() as f64;
        let mut ac_phase_w = [0.0; 3];
        for ph in &phases {
            ac_phase_w[ph.index()] = ac;
            grid_w[ph.index()] -= ac;
        }
        let charge_w = if soc >= 95.0 { 0.0 } else { battery_max_w };
        let discharge_w = if soc <= 10.0 { 0.0 } else { battery_max_w };
        described.push(json!({
            "phases": phases.iter().map(|p| p.index()).collect::<Vec<_>>(),
            "rated_w": rated_w,
            "pv_w": pv_w,
            "charge_w": charge_w,
            "discharge_w": discharge_w,
        }));
        units.push(UnitParams {
            id: format!("u{k}"),
            rated_w,
            phases,
            max_charge_w: battery_max_w,
            max_discharge_w: battery_max_w,
            soc_min_pct: 10.0,
            soc_max_pct: 95.0,
            step_w: rated_w / 1000.0,
        });
        readings.push(UnitInput {
            health: UnitHealth::Ok,
            reading: Some(UnitReading {
                ac_phase_w,
                ac_w: pv_w,
                pv_w,
                battery_w: 0.0,
                soc_pct: soc,
            }),
        });
    }
    // `net_w` is the grid with every unit at 0 W: the loads, nothing else behind the meter.
    net_w.iter_mut().for_each(|x| *x = x.round());
    let export_w = rng.random_range(0.0..3_000.0f64).round();
    let import_w = rng
        .random_bool(0.5)
        .then(|| rng.random_range(2_000.0..6_000.0f64).round());
    let params = ControlParams {
        phases: Phase::ALL.to_vec(),
        nominal_v: 230.0,
        export: GridLimit::PhasePower(export_w),
        import: import_w.map(GridLimit::PhasePower),
        margin_w: MARGIN_W,
        ramp_pct_per_s: 100.0,
        deadband_w: 20.0,
        deadband_pct: 1.0,
        direction_dwell_s: 30.0,
        conflict_priority: ConflictPriority::Export,
        fail_safe_after_s: 2.0,
        cycle_s: 1.0,
        mode: ModeParams {
            mode: WorkingMode::SelfConsumption,
            tz: chrono_tz::UTC,
            windows: vec![],
            reserve_soc_pct: 0.0,
        },
        units,
    };
    let constraints = Constraints::gather(&params, &Default::default(), None);
    let snapshot = Snapshot {
        time: Utc.with_ymd_and_hms(2026, 6, 21, 12, 0, 0).unwrap(),
        mono_s: 100.0,
        grid: Some(GridReading {
            phases: Phase::ALL
                .iter()
                .map(|&ph| (ph, grid_w[ph.index()], 230.0))
                .collect(),
            age_s: 0.1,
        }),
        units: readings,
        constraints,
    };
    // The controller aims `margin` inside each limit; the reference is given the same aim.
    let reference = json!({
        "units": described,
        "net_w": net_w,
        "export_w": export_w - MARGIN_W,
        "import_w": import_w.map(|w| w - MARGIN_W),
    });
    Site {
        params,
        snapshot,
        reference,
        export_w,
        import_w,
    }
}

/// The reference optima, one per snapshot: `Some(curtailed W)`, or `None` where no setpoints
/// meet every limit.
fn reference_optima(snapshots: &[Value]) -> Vec<Option<f64>> {
    let v = common::reference::answer(
        std::path::Path::new(common::reference::DEBIAN_PYTHON),
        "tests/reference/curtailment_lp.py",
        &Value::from(snapshots.to_vec()),
    );
    let v = v.as_array().expect("reference JSON list");
    assert_eq!(v.len(), snapshots.len(), "one optimum per snapshot");
    v.iter().map(|o| o["curtailed_w"].as_f64()).collect()
}

#[test]
fn mixed_fleet_curtailment_is_within_one_percent_of_an_independent_optimum() {
    let mut rng = SmallRng::seed_from_u64(11);
    let (mut compared, mut curtailing, mut worst_pct, mut worst_w) = (0, 0, 0.0f64, 0.0f64);
    let sites: Vec<Site> = (0..60).map(|_| random_site(&mut rng)).collect();
    let references: Vec<Value> = sites.iter().map(|s| s.reference.clone()).collect();
    let optima = reference_optima(&references);
    for (case, (site, optimum)) in sites.iter().zip(optima).enumerate() {
        let Some(optimum_w) = optimum else {
            continue;
        };
        let (d, _) = step(&site.params, &site.snapshot, &ControlState::default());
        let g = d.predicted_grid_w;
        for (k, &gk) in g.iter().enumerate() {
            assert!(
                -gk <= site.export_w + 1.0,
                "case {case}: L{} exports {:.0} W over a {} W limit",
                k + 1,
                -gk,
                site.export_w
            );
            if let Some(import_w) = site.import_w {
                assert!(
                    gk <= import_w + 1.0,
                    "case {case}: L{} imports {gk:.0} W over a {import_w} W limit",
                    k + 1
                );
            }
        }
        // One register step per unit of rounding is allowed on top of the 1 %.
        let rounding_w: f64 = site.params.units.iter().map(|u| u.step_w).sum();
        let allowed_w = optimum_w * 1.01 + rounding_w;
        assert!(
            d.curtailed_w <= allowed_w,
            "case {case}: curtailed {:.0} W, optimum {optimum_w:.0} W",
            d.curtailed_w
        );
        compared += 1;
        if optimum_w > 100.0 {
            curtailing += 1;
            worst_pct = worst_pct.max((d.curtailed_w - optimum_w) / optimum_w * 100.0);
            worst_w = worst_w.max(d.curtailed_w - optimum_w);
        }
    }
    println!(
        "{compared} sites compared, {curtailing} needing curtailment; worst excess over the optimum {worst_pct:.2} % ({worst_w:.0} W; register rounding up to one step per unit)"
    );
    assert!(
        curtailing >= 10,
        "too few sites needed curtailment to compare"
    );
}
