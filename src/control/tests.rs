use chrono::TimeZone;

use super::*;
use crate::config::{ConflictPriority, TouKind, WorkingMode};
use params::{ModeParams, TouWindow};

fn unit(id: &str, rated_w: f64, phases: Vec<Phase>) -> UnitParams {
    UnitParams {
        id: id.into(),
        rated_w,
        phases,
        max_charge_w: rated_w,
        max_discharge_w: rated_w,
        soc_min_pct: 10.0,
        soc_max_pct: 100.0,
        step_w: 0.0,
    }
}

fn params(units: Vec<UnitParams>, export: GridLimit) -> ControlParams {
    ControlParams {
        phases: Phase::ALL.to_vec(),
        nominal_v: 230.0,
        export,
        import: None,
        margin_w: 50.0,
        ramp_pct_per_s: 100.0,
        deadband_w: 20.0,
        deadband_pct: 0.0,
        direction_dwell_s: 0.0,
        conflict_priority: ConflictPriority::Export,
        fail_safe_after_s: 2.0,
        cycle_s: 1.0,
        mode: ModeParams {
            mode: WorkingMode::SelfConsumption,
            tz: chrono_tz::Europe::London,
            windows: vec![],
            reserve_soc_pct: 0.0,
        },
        units,
    }
}

/// Units of 10 kW on the given phases, under `export`.
pub(crate) fn params_with(phases: &[&[Phase]], export: GridLimit) -> ControlParams {
    let units = phases
        .iter()
        .enumerate()
        .map(|(i, ph)| unit(&format!("u{i}"), 10_000.0, ph.to_vec()))
        .collect();
    params(units, export)
}

fn fleet3(n: usize) -> Vec<UnitParams> {
    (0..n)
        .map(|i| unit(&format!("u{i}"), 10_000.0, Phase::ALL.to_vec()))
        .collect()
}

/// A snapshot where every unit delivers `ac_w` (spread over its phases) from `pv_w`.
fn snap(p: &ControlParams, grid_w: [f64; 3], pv_w: f64, soc: f64) -> Snapshot {
    Snapshot {
        time: Utc.with_ymd_and_hms(2026, 6, 21, 11, 0, 0).unwrap(),
        mono_s: 100.0,
        grid: Some(GridReading {
            phases: Phase::ALL
                .iter()
                .map(|&ph| (ph, grid_w[ph.index()], 230.0))
                .collect(),
            age_s: 0.1,
        }),
        units: p
            .units
            .iter()
            .map(|u| {
                let mut ac = [0.0; 3];
                for ph in &u.phases {
                    ac[ph.index()] = pv_w / u.phases.len() as f64;
                }
                UnitInput {
                    health: UnitHealth::Ok,
                    reading: Some(UnitReading {
                        ac_phase_w: ac,
                        ac_w: pv_w,
                        pv_w,
                        battery_w: 0.0,
                        soc_pct: soc,
                    }),
                }
            })
            .collect(),
        constraints: Constraints::gather(p, &Default::default(), None),
    }
}

fn batteries(d: &Decision) -> Vec<f64> {
    d.setpoints
        .iter()
        .map(|s| s.map_or(0.0, |s| s.battery_w))
        .collect()
}

fn total(v: &[f64]) -> f64 {
    v.iter().sum()
}

#[test]
fn self_consumption_discharges_to_cover_load_and_shares_evenly() {
    let p = params(fleet3(4), GridLimit::Total(0.0));
    let (d, _) = step(
        &p,
        &snap(&p, [2000.0, 2000.0, 2000.0], 0.0, 50.0),
        &ControlState::default(),
    );
    let b = batteries(&d);
    assert!((total(&b) - 5950.0).abs() < 1.0, "{b:?}");
    assert!(
        b.iter().all(|&x| (x - b[0]).abs() < 1e-6),
        "equal units share equally: {b:?}"
    );
    assert!(!d.fail_safe);
    assert_eq!(d.active_mode, "self_consumption");
}

#[test]
fn surplus_goes_into_batteries_before_pv_is_curtailed() {
    let p = params(fleet3(10), GridLimit::Total(0.0));
    // 80 kW of PV flowing, 20 kW load: the grid sees 60 kW export.
    let s = snap(&p, [-20_000.0; 3], 8_000.0, 50.0);
    let (d, _) = step(&p, &s, &ControlState::default());
    let b = batteries(&d);
    assert!((total(&b) + 60_050.0).abs() < 1.0, "{}", total(&b));
    for sp in d.setpoints.iter().flatten() {
        // Output cap above planned output: no PV curtailed.
        assert!(sp.output_cap_w >= 8_000.0 + sp.battery_w - 1.0);
    }
    assert!(d.predicted_grid_w.iter().sum::<f64>() >= 49.0);
}

#[test]
fn full_batteries_mean_curtailment_to_the_limit() {
    let p = params(fleet3(10), GridLimit::Total(0.0));
    let s = snap(&p, [-20_000.0; 3], 8_000.0, 100.0);
    let (d, _) = step(&p, &s, &ControlState::default());
    assert_eq!(
        d.binding.map(|b| b.label()).as_deref(),
        Some("export_limit")
    );
    let caps: f64 = d.setpoints.iter().flatten().map(|s| s.output_cap_w).sum();
    // Load is 20 kW: the fleet may deliver that less the 50 W margin.
    assert!((caps - 19_950.0).abs() < 1.0, "{caps}");
    assert!(d.predicted_grid_w.iter().sum::<f64>() >= 49.0);
}

#[test]
fn rises_ramp_and_falls_apply_at_once() {
    let mut p = params(fleet3(1), GridLimit::Total(0.0));
    p.ramp_pct_per_s = 20.0; // 2 kW/s on a 10 kW unit
    let s = snap(&p, [2000.0, 2000.0, 2000.0], 0.0, 50.0);
    let (d, st) = step(&p, &s, &ControlState::default());
    assert!(
        (batteries(&d)[0] - 2000.0).abs() < 1e-6,
        "first cycle rises by one ramp step"
    );
    let mut s2 = s.clone();
    s2.mono_s += 1.0;
    let (d, st) = step(&p, &s2, &st);
    assert!((batteries(&d)[0] - 4000.0).abs() < 1e-6);
    // Load gone: the discharge stops in the same cycle.
    let mut s3 = snap(&p, [0.0; 3], 0.0, 50.0);
    s3.units[0].reading.as_mut().unwrap().battery_w = 4000.0;
    s3.units[0].reading.as_mut().unwrap().ac_w = 4000.0;
    s3.units[0].reading.as_mut().unwrap().ac_phase_w = [4000.0 / 3.0; 3];
    s3.grid.as_mut().unwrap().phases = Phase::ALL
        .iter()
        .map(|&ph| (ph, -4000.0 / 3.0, 230.0))
        .collect();
    s3.mono_s = s2.mono_s + 1.0;
    let (d, _) = step(&p, &s3, &st);
    assert!(batteries(&d)[0] <= 0.0, "{:?}", batteries(&d));
}

#[test]
fn deadband_ignores_small_changes() {
    let p = params(fleet3(1), GridLimit::Total(0.0));
    let s = snap(&p, [1000.0, 1000.0, 1000.0], 0.0, 50.0);
    let (d1, st) = step(&p, &s, &ControlState::default());
    let mut s2 = s.clone();
    s2.mono_s += 1.0;
    // Load up by 15 W: under the 20 W deadband.
    s2.grid.as_mut().unwrap().phases[0].1 += 15.0;
    let (d2, _) = step(&p, &s2, &st);
    assert_eq!(batteries(&d1), batteries(&d2));
}

#[test]
fn lost_meter_sends_every_unit_to_the_safe_state() {
    let p = params(fleet3(3), GridLimit::Total(0.0));
    let mut s = snap(&p, [0.0; 3], 5000.0, 50.0);
    s.grid.as_mut().unwrap().age_s = 2.5;
    let (d, _) = step(&p, &s, &ControlState::default());
    assert!(d.fail_safe);
    assert_eq!(d.binding.map(|b| b.label()).as_deref(), Some("fail_safe"));
    for sp in d.setpoints.iter().flatten() {
        assert_eq!(sp.output_cap_w, 0.0);
        assert!(sp.battery_w <= 0.0);
    }
    let mut s = snap(&p, [0.0; 3], 0.0, 50.0);
    s.grid = None;
    assert!(step(&p, &s, &ControlState::default()).0.fail_safe);
}

#[test]
fn an_unhealthy_unit_gets_no_setpoint_and_the_rest_take_its_share() {
    let p = params(fleet3(4), GridLimit::Total(0.0));
    let mut s = snap(&p, [2000.0, 2000.0, 2000.0], 0.0, 50.0);
    s.units[1] = UnitInput {
        health: UnitHealth::Stale,
        reading: None,
    };
    let (d, _) = step(&p, &s, &ControlState::default());
    assert!(d.setpoints[1].is_none());
    let b = batteries(&d);
    assert!((total(&b) - 5950.0).abs() < 1.0, "{b:?}");
}

/// Loads of 4, 1 and 0 kW on L1–L3, one 5 kW single-phase unit per phase with 5 kW of PV
/// each and full batteries, 1 kW per-phase export limit.
fn unbalanced_site(limit: GridLimit) -> (ControlParams, Snapshot) {
    let units = vec![
        unit("a", 5000.0, vec![Phase::L1]),
        unit("b", 5000.0, vec![Phase::L2]),
        unit("c", 5000.0, vec![Phase::L3]),
    ];
    let p = params(units, limit);
    let loads = [4000.0, 1000.0, 0.0];
    let grid = [loads[0] - 5000.0, loads[1] - 5000.0, loads[2] - 5000.0];
    let s = snap(&p, grid, 5000.0, 100.0);
    (p, s)
}

#[test]
fn phase_power_limit_holds_each_phase_and_beats_worst_phase_times_three() {
    let (p, s) = unbalanced_site(GridLimit::PhasePower(1000.0));
    let (d, _) = step(&p, &s, &ControlState::default());
    for g in d.predicted_grid_w {
        assert!(-g <= 1000.0, "phase export {g}");
    }
    let export: f64 = -d.predicted_grid_w.iter().sum::<f64>();
    // Worst phase × 3: all units held to the output that keeps the lightest-loaded phase at
    // the limit: 3 × (1 kW + 0 kW) − 5 kW of load = −2 kW, i.e. a net import.
    let naive = 3.0 * 1000.0 + 3.0 * 0.0 - 5000.0;
    assert!(export > naive + 4000.0, "export {export} vs naive {naive}");
    assert!(d
        .binding
        .map(|b| b.label())
        .as_deref()
        .unwrap()
        .starts_with("export_limit:"));
}

#[test]
fn phase_current_limit_uses_measured_voltage() {
    let (p, s) = unbalanced_site(GridLimit::PhaseCurrent(2.0));
    let (d, _) = step(&p, &s, &ControlState::default());
    for g in d.predicted_grid_w {
        // 2 A × 230 V = 460 W per phase.
        assert!(-g <= 460.0 + 1e-6, "phase export {g}");
    }
}

#[test]
fn three_phase_units_on_an_unbalanced_site_hold_the_worst_phase() {
    let p = params(fleet3(2), GridLimit::PhasePower(500.0));
    // Full batteries, 16 kW of PV, loads 6 / 2 / 0 kW.
    let loads = [6000.0, 2000.0, 0.0];
    let grid = loads.map(|l| l - 16_000.0 / 3.0);
    let (d, _) = step(&p, &snap(&p, grid, 8000.0, 100.0), &ControlState::default());
    let worst = d
        .predicted_grid_w
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    assert!(-worst <= 500.0 + 1e-6);
    assert!(
        -worst >= 400.0,
        "no more curtailment than the worst phase needs: {worst}"
    );
}

#[test]
fn import_limit_raises_discharge() {
    let mut p = params(fleet3(2), GridLimit::Total(0.0));
    p.import = Some(GridLimit::Total(4000.0));
    // A charge window asks for 10 kW of charging on top of 3 kW of load.
    p.mode.mode = WorkingMode::TimeOfUse;
    p.mode.windows = vec![TouWindow {
        kind: TouKind::Charge,
        window: every_day(0, 24 * 60),
        power_w: Some(10_000.0),
    }];
    let (d, _) = step(
        &p,
        &snap(&p, [1000.0; 3], 0.0, 50.0),
        &ControlState::default(),
    );
    // Load plus charging may not exceed 4 kW − 50 W of import: 950 W of charging is left.
    assert!(d.predicted_grid_w.iter().sum::<f64>() <= 3950.0 + 1e-6);
    assert!(
        (total(&batteries(&d)) + 950.0).abs() < 1.0,
        "{:?}",
        batteries(&d)
    );
    assert_eq!(
        d.binding.map(|b| b.label()).as_deref(),
        Some("import_limit")
    );
}

fn every_day(start_min: u32, end_min: u32) -> crate::calendar::Window {
    use crate::calendar::{ClockTime, Days, Window};
    Window {
        days: Days::ALL,
        start: ClockTime::from_minutes(start_min).unwrap(),
        end: ClockTime::from_minutes(end_min).unwrap(),
    }
}

fn tou(kind: TouKind, start: u32, end: u32) -> ControlParams {
    let mut p = params(fleet3(2), GridLimit::Total(0.0));
    p.mode.mode = WorkingMode::TimeOfUse;
    p.mode.windows = vec![TouWindow {
        kind,
        window: every_day(start, end),
        power_w: Some(6000.0),
    }];
    p
}

#[test]
fn time_of_use_windows_in_the_site_timezone() {
    // 11:00 UTC is 12:00 in London in June.
    let at_noon = |p: &ControlParams| {
        let s = snap(p, [1000.0; 3], 0.0, 50.0);
        step(p, &s, &ControlState::default()).0
    };
    // Charge window 11:30–12:30 local: the batteries charge although the site imports.
    let d = at_noon(&tou(TouKind::Charge, 11 * 60 + 30, 12 * 60 + 30));
    assert_eq!(d.active_mode, "tou_charge");
    assert!((total(&batteries(&d)) + 6000.0).abs() < 1.0);
    // Discharge window: discharge only (export limit 0 keeps it to the load).
    let d = at_noon(&tou(TouKind::Discharge, 11 * 60, 13 * 60));
    assert_eq!(d.active_mode, "tou_discharge");
    assert!(batteries(&d).iter().all(|&b| b >= 0.0));
    assert!(total(&batteries(&d)) <= 3000.0);
    // The window 11:00–12:00 UTC would include now, but windows are local: self-use.
    let d = at_noon(&tou(TouKind::Charge, 10 * 60, 11 * 60 + 59));
    assert_eq!(d.active_mode, "self_consumption");
    // Overnight window wraps midnight.
    let d = at_noon(&tou(TouKind::Charge, 22 * 60, 13 * 60));
    assert_eq!(d.active_mode, "tou_charge");
}

#[test]
fn discharge_window_does_not_charge_from_surplus() {
    let p = tou(TouKind::Discharge, 0, 24 * 60);
    let (d, _) = step(
        &p,
        &snap(&p, [-3000.0; 3], 8000.0, 50.0),
        &ControlState::default(),
    );
    assert!(batteries(&d).iter().all(|&b| b >= 0.0));
}

#[test]
fn backup_reserve_rules() {
    let mut p = params(fleet3(2), GridLimit::Total(0.0));
    p.mode.mode = WorkingMode::Backup;
    p.mode.reserve_soc_pct = 40.0;
    let run = |soc: f64, grid: f64, pv: f64| {
        let s = snap(&p, [grid; 3], pv, soc);
        step(&p, &s, &ControlState::default()).0
    };
    // Below the reserve: only charging, from the grid if need be.
    let d = run(30.0, 1000.0, 0.0);
    assert_eq!(d.active_mode, "backup_charge");
    assert!(batteries(&d).iter().all(|&b| b < 0.0));
    // At the reserve: no discharge although the site imports.
    let d = run(40.2, 1000.0, 0.0);
    assert!(
        batteries(&d).iter().all(|&b| b.abs() < 1e-9),
        "{:?}",
        batteries(&d)
    );
    // Above: self-consumption.
    let d = run(60.0, 1000.0, 0.0);
    assert!((total(&batteries(&d)) - 2950.0).abs() < 1.0);
}

#[test]
fn soc_bounds_stop_charge_and_discharge() {
    let p = params(fleet3(2), GridLimit::Total(0.0));
    let d = step(
        &p,
        &snap(&p, [1000.0; 3], 0.0, 10.0),
        &ControlState::default(),
    )
    .0;
    assert!(batteries(&d).iter().all(|&b| b == 0.0));
    assert_eq!(d.binding.map(|b| b.label()).as_deref(), Some("soc"));
}

#[test]
fn plan_mode_follows_targets_and_falls_back_to_self_consumption() {
    let mut p = params(fleet3(2), GridLimit::Total(0.0));
    p.mode.mode = WorkingMode::Plan;
    let mut s = snap(&p, [1000.0; 3], 0.0, 50.0);
    let d = step(&p, &s, &ControlState::default()).0;
    assert_eq!(d.active_mode, "self_consumption", "no plan yet");
    s.constraints.plan = Some(vec![Some(-2000.0), Some(-2000.0)]);
    let d = step(&p, &s, &ControlState::default()).0;
    assert_eq!(d.active_mode, "plan");
    assert_eq!(batteries(&d), vec![-2000.0, -2000.0]);
}

#[test]
fn a_faulted_unit_that_exports_is_held_and_curtailed_not_abandoned() {
    // One unit reports a fault but runs: its battery discharges 1.5 kW into a 0 W limit site
    // with no load. It gets a setpoint — battery idle, output cap down to what the limit
    // leaves — and the export is expected back under the limit.
    let p = params(fleet3(2), GridLimit::Total(0.0));
    let mut s = snap(&p, [-500.0; 3], 0.0, 50.0);
    for (k, u) in s.units.iter_mut().enumerate() {
        let r = u.reading.as_mut().unwrap();
        if k == 0 {
            u.health = UnitHealth::Faulted;
            *r = UnitReading {
                ac_phase_w: [500.0; 3],
                ac_w: 1500.0,
                pv_w: 0.0,
                battery_w: 1500.0,
                soc_pct: 50.0,
            };
        }
    }
    let (d, _) = step(&p, &s, &ControlState::default());
    let sp = d.setpoints[0].expect("a faulted unit is still commanded");
    assert_eq!(d.held[..], [Some(UnitHealth::Faulted), None]);
    assert!(d.urgent, "1.5 kW export under a 0 W limit");
    assert_eq!(sp.battery_w, 0.0);
    let export_w = -d.predicted_grid_w.iter().sum::<f64>();
    assert!(export_w <= 0.0, "predicted export {export_w} W, {d:?}");
}

#[test]
fn a_battery_turns_at_most_once_per_dwell_time_unless_urgent() {
    let turn = |urgent| Turn {
        dwell_s: 30.0,
        min_w: 100.0,
        urgent,
        now_s: 110.0,
    };
    let discharging = Some((1, 100.0));
    // 10 s after it began discharging it may not start charging: it idles instead.
    assert_eq!(turn(false).apply(-2000.0, discharging), (0.0, discharging));
    // Unless the limit is crossed now.
    assert_eq!(
        turn(true).apply(-2000.0, discharging),
        (-2000.0, Some((-1, 110.0)))
    );
    // After the dwell, a turn to a power worth turning for goes through; a tiny one does not.
    let long_ago = Some((1, 0.0));
    assert_eq!(turn(false).apply(-50.0, long_ago), (0.0, long_ago));
    assert_eq!(
        turn(false).apply(-2000.0, long_ago),
        (-2000.0, Some((-1, 110.0)))
    );
}

/// A unit's reading for [`snap_each`]: PV, battery power and SOC.
#[derive(Clone, Copy)]
struct Unit {
    pv_w: f64,
    battery_w: f64,
    soc: f64,
}

/// A unit with no PV and its battery idle at half charge.
const IDLE: Unit = Unit {
    pv_w: 0.0,
    battery_w: 0.0,
    soc: 50.0,
};

/// A snapshot with each unit's own PV, battery and SOC; `loads_w` per phase, nothing else
/// behind the meter.
fn snap_each(p: &ControlParams, loads_w: [f64; 3], each: &[Unit]) -> Snapshot {
    let mut s = snap(p, [0.0; 3], 0.0, 50.0);
    let mut grid = loads_w;
    for (k, (up, u)) in p.units.iter().zip(each).enumerate() {
        let ac_w = u.pv_w + u.battery_w;
        let mut ac = [0.0; 3];
        for ph in &up.phases {
            ac[ph.index()] = ac_w / up.phases.len() as f64;
            grid[ph.index()] -= ac[ph.index()];
        }
        s.units[k].reading = Some(UnitReading {
            ac_phase_w: ac,
            ac_w,
            pv_w: u.pv_w,
            battery_w: u.battery_w,
            soc_pct: u.soc,
        });
    }
    s.grid = Some(GridReading {
        phases: Phase::ALL
            .iter()
            .map(|&ph| (ph, grid[ph.index()], 230.0))
            .collect(),
        age_s: 0.1,
    });
    s
}

#[test]
fn per_phase_export_is_held_with_the_least_curtailment_on_a_mixed_fleet() {
    // Full batteries. A single-phase unit on L1 (4 kW PV) and two three-phase units (9 kW
    // PV each); loads 7 / 3 / 6 kW: L1 and L2 are each 3 kW over a 0 W per-phase limit.
    // Curtailing the three-phase units by 9 kW fixes both; the L1 unit need not curtail
    // (tier by tier it did too: 12 kW).
    let mut p = params_with(
        &[&[Phase::L1], &Phase::ALL, &Phase::ALL],
        GridLimit::PhasePower(0.0),
    );
    p.margin_w = 0.0;
    let full = |pv_w| Unit {
        pv_w,
        battery_w: 0.0,
        soc: 100.0,
    };
    let s = snap_each(
        &p,
        [7000.0, 3000.0, 6000.0],
        &[full(4000.0), full(9000.0), full(9000.0)],
    );
    let (d, _) = step(&p, &s, &ControlState::default());
    for g in d.predicted_grid_w {
        assert!(g >= -1.0, "phase export {g}: {:?}", d.predicted_grid_w);
    }
    assert!(
        (d.curtailed_w - 9000.0).abs() < 20.0,
        "curtailed {} W",
        d.curtailed_w
    );
}

#[test]
fn an_import_excess_on_one_phase_is_covered_without_export_on_the_others() {
    // A three-phase unit and a single-phase unit on L1 (3 kW battery), both discharging;
    // 5 kW of load on L1 only, 2 kW import per phase allowed, 0 W export per phase.
    let mut p = params_with(&[&Phase::ALL, &[Phase::L1]], GridLimit::PhasePower(0.0));
    p.units[1].max_discharge_w = 3000.0;
    p.import = Some(GridLimit::PhasePower(2000.0));
    p.margin_w = 0.0;
    let s = snap_each(&p, [5000.0, 0.0, 0.0], &[IDLE, IDLE]);
    let (d, _) = step(&p, &s, &ControlState::default());
    let g = d.predicted_grid_w;
    assert!(g[0] <= 2001.0, "L1 import {g:?}");
    assert!(g[1] >= -1.0 && g[2] >= -1.0, "export on L2/L3 {g:?}");
    let b = batteries(&d);
    assert!(b.iter().all(|&x| x >= 0.0), "one direction: {b:?}");
}

#[test]
fn an_export_import_conflict_holds_the_configured_limit() {
    // One three-phase unit, 5 kW of load on L1 only: import ≤ 2 kW on L1 needs 9 kW of
    // output, export ≤ 0 W on L2 and L3 allows none. Both cannot hold.
    let mut p = params_with(&[&Phase::ALL], GridLimit::PhasePower(0.0));
    p.import = Some(GridLimit::PhasePower(2000.0));
    p.margin_w = 0.0;
    let s = snap_each(&p, [5000.0, 0.0, 0.0], &[IDLE]);

    let (d, _) = step(&p, &s, &ControlState::default());
    let g = d.predicted_grid_w;
    assert!(g[1] >= -1.0 && g[2] >= -1.0, "export holds: {g:?}");
    assert_eq!(
        d.binding.map(|b| b.label()).as_deref(),
        Some("conflict:export_holds")
    );

    p.conflict_priority = ConflictPriority::Import;
    let (d, _) = step(&p, &s, &ControlState::default());
    let g = d.predicted_grid_w;
    assert!(g[0] <= 2001.0, "import holds: {g:?}");
    assert_eq!(
        d.binding.map(|b| b.label()).as_deref(),
        Some("conflict:import_holds")
    );
}
