//! Closed loop on the simulator over real Modbus: export limits in the three modes, fail-safe
//! on meter loss, a lost inverter, and clean hand-back on shutdown.

#![cfg(feature = "sim")]

mod common;

use common::demo_1s;
use site_ems::config::SiteConfig;
use site_ems::drivers::saj::{app_mode, reg};
use site_ems::sim::lockstep::{ClosedLoop, Excursions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_drop_at_sunny_midday_export_back_under_zero_within_2_s() {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.run(30.0, |_, _| {}).await;
    assert!(
        l.export_w() <= 0.0,
        "settled before the step: export {}",
        l.export_w()
    );

    let r = l.load_step_response(-5000.0, 0.0, 30.0).await;
    let exc = r.excursions;
    let back = r.back_after_s.expect("export came back under the limit");
    assert!(back <= 2.0, "export back under the limit after {back:.1} s");
    assert!(exc.longest_s() <= 2.0, "excursions {:?}", exc.done);
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_day_with_random_load_steps_has_no_15_s_excursion() {
    use rand::{Rng, SeedableRng};
    let mut c = demo_1s();
    c.simulation.start = Some("2026-06-21T00:00".into());
    c.simulation.load_noise_pct = 3.0;
    let mut l = ClosedLoop::start(c).await.unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut exc = Excursions::default();
    let mut next_step_s = 0.0;
    let mut steps = 0;
    while l.t_s < 86_400.0 {
        if l.t_s >= next_step_s {
            let step_w: f64 = rng.random_range(-8000.0..8000.0);
            l.sim.with_model(|m| m.load_step_w = step_w);
            next_step_s = l.t_s + rng.random_range(60.0..1800.0);
            steps += 1;
        }
        l.tick().await;
        exc.observe(l.t_s, l.export_w(), 0.0);
    }
    exc.finish(l.t_s);
    let curtailed = l
        .sim
        .with_model(|m| m.inverters.iter().any(|i| i.soc_pct > 99.0));
    println!(
        "day: {steps} load steps, {} excursions, longest {:.1} s, worst {:.0} W, batteries filled: {curtailed}",
        exc.done.len(),
        exc.longest_s(),
        exc.worst_w
    );
    assert!(steps > 40);
    assert!(exc.longest_s() < 15.0, "excursions {:?}", exc.done);
    l.assert_clean_writes();
}

fn unbalanced(limit: &str) -> SiteConfig {
    let text = format!(
        r#"
site: {{ name: unbalanced, timezone: UTC }}
grid: {{ phases: 3 }}
export_limit: {limit}
control: {{ cycle_ms: 1000 }}
links:
  - {{ name: m, type: tcp, host: 127.0.0.1 }}
  - {{ name: a, type: tcp, host: 127.0.0.1 }}
  - {{ name: b, type: tcp, host: 127.0.0.1 }}
  - {{ name: c, type: tcp, host: 127.0.0.1 }}
meters:
  - {{ id: grid, role: grid, model: dtsu666, link: m, unit_id: 1 }}
inverters:
  - {{ id: l1, model: saj-hs2, rated_power_w: 5000, phase: L1, link: a, unit_id: 1,
      battery: {{ capacity_wh: 5000, max_charge_w: 5000, max_discharge_w: 5000 }} }}
  - {{ id: l2, model: saj-hs2, rated_power_w: 5000, phase: L2, link: b, unit_id: 1,
      battery: {{ capacity_wh: 5000, max_charge_w: 5000, max_discharge_w: 5000 }} }}
  - {{ id: l3, model: saj-hs2, rated_power_w: 5000, phase: L3, link: c, unit_id: 1,
      battery: {{ capacity_wh: 5000, max_charge_w: 5000, max_discharge_w: 5000 }} }}
simulation:
  start: 2026-06-21T12:00
  base_load_w: 5000
  peak_load_w: 5000
  load_phase_shares: [0.8, 0.2, 0.0]
  load_noise_pct: 0
  pv_peak_ratio: 1.0
  initial_soc_pct: 100
"#
    );
    SiteConfig::from_str("unbalanced.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

/// Per-phase export excursions above `limit_w` on each phase after a settling period.
async fn phase_excursions(
    l: &mut ClosedLoop,
    seconds: f64,
    limit_w: [f64; 3],
) -> ([Excursions; 3], f64) {
    l.run(10.0, |_, _| {}).await;
    let mut exc: [Excursions; 3] = Default::default();
    let mut export_sum = 0.0;
    let mut n = 0.0;
    l.run(seconds, |t, m| {
        for k in 0..3 {
            exc[k].observe(t, -m.truth.grid_w[k], limit_w[k]);
        }
        export_sum += -m.truth.grid_w.iter().sum::<f64>();
        n += 1.0;
    })
    .await;
    for e in exc.iter_mut() {
        e.finish(l.t_s);
    }
    (exc, export_sum / n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_power_on_an_unbalanced_site_beats_worst_phase_times_three() {
    let mut l = ClosedLoop::start(unbalanced("{ mode: phase_power, limit_w: 1000 }"))
        .await
        .unwrap();
    let (exc, mean_export) = phase_excursions(&mut l, 60.0, [1000.0; 3]).await;
    for (k, e) in exc.iter().enumerate() {
        assert!(e.longest_s() <= 2.0, "L{}: {:?}", k + 1, e.done);
    }
    // Loads 4 / 1 / 0 kW. Held as one block until the lightest phase is at its limit, the
    // three units could deliver 1 kW each: 3 × (1 kW + 0 kW) − 5 kW = 2 kW net import.
    let naive_export = 3.0 * 1000.0 + 3.0 * 0.0 - 5000.0;
    println!("mean export {mean_export:.0} W vs worst-phase × 3: {naive_export:.0} W");
    assert!(
        mean_export > naive_export + 4000.0,
        "mean export {mean_export}"
    );
    let d = l.ems.last_decision().unwrap();
    assert!(
        matches!(
            d.binding,
            Some(site_ems::control::Binding::Export {
                source: site_ems::control::Source::Site,
                phase: Some(_)
            })
        ),
        "{:?}",
        d.binding
    );
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_current_limit_is_honoured_per_phase() {
    let mut l = ClosedLoop::start(unbalanced("{ mode: phase_current, limit_a: 3 }"))
        .await
        .unwrap();
    // 3 A per phase at the measured voltage (about 230 V).
    let limit = l.sim.with_model(|m| m.truth.voltage_v.map(|v| 3.0 * v));
    let (exc, _) = phase_excursions(&mut l, 60.0, limit).await;
    for (k, e) in exc.iter().enumerate() {
        assert!(e.longest_s() <= 2.0, "L{}: {:?}", k + 1, e.done);
    }
    // Export reaches the limit on the unloaded phase instead of being cut to zero.
    let l3 = l.phase_export_w()[2];
    assert!(
        l3 > 0.8 * limit[2] && l3 <= limit[2] + 1.0,
        "L3 export {l3}"
    );
    l.assert_clean_writes();
}

fn safe_state(l: &ClosedLoop) -> bool {
    l.sim.with_model(|m| {
        m.inverters.iter().all(|i| {
            i.app_mode() == app_mode::PASSIVE
                && i.setting(reg::ANTI_REFLUX_MODE) == 1
                && i.setting(reg::ANTI_REFLUX_POWER) == 0
                && i.battery_w <= 1.0
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_meter_lost_sends_fleet_to_safe_state_within_5_s_and_recovers() {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // Midday: without control the fleet would push tens of kW out.
    assert!(!safe_state(&l));
    let last_good = l.t_s;
    assert!(l.sim.stop_device("grid"));
    let mut safe_at = None;
    let mut export_ok_at = None;
    while l.t_s < last_good + 10.0 {
        l.tick().await;
        if safe_at.is_none() && safe_state(&l) {
            safe_at = Some(l.t_s - last_good);
        }
        if export_ok_at.is_none() && safe_at.is_some() && l.export_w() <= 0.0 {
            export_ok_at = Some(l.t_s - last_good);
        }
    }
    let safe_at = safe_at.expect("every inverter in the safe state");
    assert!(safe_at <= 5.0, "safe after {safe_at:.1} s");
    let export_ok = export_ok_at.expect("export at or below the limit");
    assert!(
        export_ok <= 5.0,
        "export under the limit after {export_ok:.1} s"
    );
    assert!(l.ems.last_decision().unwrap().fail_safe);
    // Stays safe while the meter is away.
    l.run(10.0, |_, m| {
        assert!(m.truth.grid_w.iter().sum::<f64>() >= 0.0)
    })
    .await;

    l.sim.restart_device("grid").await.unwrap();
    let mut resumed = false;
    for _ in 0..300 {
        l.tick().await;
        if l.ems.last_decision().is_some_and(|d| !d.fail_safe) && !safe_state(&l) {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "normal control resumed after the meter came back");
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_inverter_others_absorb_a_load_drop() {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // inv03 stops answering but keeps running its last setpoint; then the load drops.
    assert!(l.sim.stop_device("inv03"));
    l.run(5.0, |_, _| {}).await;
    l.sim.with_model(|m| m.load_step_w = -5000.0);
    let mut exc = Excursions::default();
    l.run(30.0, |t, m| {
        exc.observe(t, -m.truth.grid_w.iter().sum::<f64>(), 0.0)
    })
    .await;
    exc.finish(l.t_s);
    assert!(exc.longest_s() <= 2.0, "excursions {:?}", exc.done);
    let d = l.ems.last_decision().unwrap();
    assert!(d.setpoints[2].is_none(), "no setpoint for the lost unit");
    assert!(d.setpoints.iter().filter(|s| s.is_some()).count() == 9);
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_are_clamped_before_the_wire() {
    use site_ems::drivers::saj::Command;
    use site_ems::io::actuation::SajActuator;
    use site_ems::io::link::Link;
    use std::sync::Arc;

    let config = demo_1s();
    let sim = site_ems::sim::SimSite::start(&config).await.unwrap();
    let wired = sim.rewire(&config);
    let link = Link::spawn(wired.link("sim-inv01").unwrap(), None);
    let mut act = SajActuator::new(Arc::from("inv01"), 1, 10_000.0, link);
    // Negative cap, a charge far beyond the rating, then NaN and infinity.
    act.apply(
        &Command {
            battery_w: -1.0e9,
            output_cap_w: -5000.0,
        },
        Duration::ZERO,
        true,
    )
    .await
    .unwrap();
    act.apply(
        &Command {
            battery_w: f64::NAN,
            output_cap_w: f64::INFINITY,
        },
        Duration::ZERO,
        true,
    )
    .await
    .unwrap();
    act.apply(
        &Command {
            battery_w: 1.0e12,
            output_cap_w: 1.0e12,
        },
        Duration::ZERO,
        true,
    )
    .await
    .unwrap();
    let writes = sim.writes();
    let value_of = |addr: u16| -> Vec<u16> {
        writes
            .iter()
            .filter(|w| w.addr == addr)
            .map(|w| w.value)
            .collect()
    };
    assert_eq!(
        value_of(reg::PASSIVE_BAT_CHARGE),
        vec![1000],
        "charge clamped to the rating"
    );
    assert_eq!(
        value_of(reg::PASSIVE_BAT_DISCHARGE),
        vec![1000],
        "discharge clamped to the rating"
    );
    // The unit's cap already reads 0, so the negative request sends nothing (write on
    // change against what was read back); the huge one goes out as the rating.
    assert_eq!(
        value_of(reg::ANTI_REFLUX_POWER),
        vec![1000],
        "cap: negative to 0, huge to the rating"
    );
    for w in &writes {
        let s = site_ems::drivers::saj::setting(w.addr).unwrap();
        assert!(w.accepted, "firmware refused {w:?}");
        assert!((s.min..=s.max).contains(&w.value), "{w:?} outside {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_of_use_charge_window_charges_at_night_then_self_consumption() {
    let mut c = demo_1s();
    c.simulation.start = Some("2026-06-21T01:50".into());
    c.working_mode.mode = site_ems::config::WorkingMode::TimeOfUse;
    c.working_mode.periods = vec![site_ems::config::TouPeriod {
        kind: site_ems::config::TouKind::Charge,
        days: vec![],
        start: "02:00".parse().unwrap(),
        end: "02:10".parse().unwrap(),
        power_w: Some(30_000.0),
    }];
    let mut l = ClosedLoop::start(c).await.unwrap();
    // 01:50–02:00 local: night, self-consumption covers the load from the batteries.
    l.run(300.0, |_, _| {}).await;
    let battery = |l: &ClosedLoop| {
        l.sim
            .with_model(|m| m.inverters.iter().map(|i| i.battery_w).sum::<f64>())
    };
    assert!(
        battery(&l) > 1000.0,
        "discharging at night: {}",
        battery(&l)
    );
    assert_eq!(
        l.ems.last_decision().unwrap().active_mode,
        "self_consumption"
    );
    // 02:00–02:10: the window charges at 30 kW from the grid.
    l.run(400.0, |_, _| {}).await;
    assert_eq!(l.ems.last_decision().unwrap().active_mode, "tou_charge");
    assert!(
        (battery(&l) + 30_000.0).abs() < 500.0,
        "charging at the window's power: {}",
        battery(&l)
    );
    // After the window: back to self-consumption.
    l.run(600.0, |_, _| {}).await;
    assert_eq!(
        l.ems.last_decision().unwrap().active_mode,
        "self_consumption"
    );
    assert!(battery(&l) > 1000.0);
    l.assert_clean_writes();
}
