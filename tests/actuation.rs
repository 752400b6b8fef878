//! Actuation you can leave in charge: what a stop, a crash and a restart leave on the
//! units, a faulted unit still commanded, firmware that never confirms passive mode, and a
//! unit that ignores its setpoint. Closed loop over real Modbus TCP against the simulator.

#![cfg(feature = "sim")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::demo_1s;
use common::lossy::LossyProxy;
use site_ems::config::{OnStop, SiteConfig, StoreConfig};
use site_ems::drivers::saj::{self, app_mode, reg};
use site_ems::runtime::{Ems, EmsOptions};
use site_ems::sim::lockstep::{ClosedLoop, Excursions, TICK_S};
use site_ems::sim::physics::AntiRefluxPoint;

fn with_store(mut c: SiteConfig, dir: &tempfile::TempDir) -> SiteConfig {
    c.store = Some(StoreConfig {
        path: dir.path().join("ems.sqlite").display().to_string(),
    });
    c
}

/// The controlled registers of every unit, as the simulated firmware holds them.
fn controlled(l: &ClosedLoop) -> Vec<Vec<(u16, u16)>> {
    l.sim.with_model(|m| {
        m.inverters
            .iter()
            .map(|i| saj::CONTROLLED.iter().map(|&a| (a, i.setting(a))).collect())
            .collect()
    })
}

/// Let the site run with nobody in charge for `seconds`, tracking export (+) excursions
/// over `limit_w`.
fn run_unattended(l: &mut ClosedLoop, seconds: f64, limit_w: f64) -> Excursions {
    let mut exc = Excursions::default();
    let mut t = 0.0;
    while t < seconds {
        l.sim.advance(TICK_S);
        t += TICK_S;
        exc.observe(t, l.export_w(), limit_w);
    }
    exc.finish(t);
    exc
}

/// Stop the EMS at sunny midday under a 0 W export limit, let the load fall away, and watch
/// ten minutes with only the units' own limits in force, measured where `at` says.
async fn clean_stop_at_midday(at: AntiRefluxPoint) -> (Excursions, f64) {
    let c = demo_1s();
    let margin = c.control.grid_margin_w;
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.sim.with_model(|m| m.anti_reflux_at = at);
    l.run(20.0, |_, _| {}).await;
    assert!(l
        .sim
        .with_model(|m| m.inverters.iter().any(|i| i.pv_w > 1000.0)));
    l.ems.stop().await;
    // The load falls away after the EMS has gone: only the units' own limits are left.
    l.sim.with_model(|m| m.load_step_w = -m.base_load_w);
    let exc = run_unattended(&mut l, 600.0, margin);
    l.sim.with_model(|m| {
        for i in &m.inverters {
            assert_ne!(i.setting(reg::PREVENT_REVERSE_FLOW), 0, "anti-reflux on");
            assert_eq!(i.setting(reg::ANTI_REFLUX_MODE), 1, "export limiting on");
            assert!(i.battery_w.abs() < 1.0, "battery idle");
        }
    });
    l.assert_clean_writes();
    (exc, margin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_at_midday_keeps_the_export_limit_for_10_minutes_without_the_ems() {
    // The unit's limit caps its own output: no export at all.
    let (exc, margin) = clean_stop_at_midday(AntiRefluxPoint::Output).await;
    assert!(
        exc.done.is_empty(),
        "export above 0 W + {margin} W margin with the EMS stopped: {:?}, worst {:.0} W",
        exc.done,
        exc.worst_w
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_holds_too_where_each_unit_limits_the_site_meter() {
    // Each unit holds the site's export at its share (0 W): only the firmware's own
    // regulation transient when the load falls away.
    let (exc, margin) = clean_stop_at_midday(AntiRefluxPoint::Site).await;
    println!("excursions {:?}, worst {:.0} W", exc.done, exc.worst_w);
    assert!(
        exc.longest_s() <= 5.0,
        "export above 0 W + {margin} W margin for more than 5 s: {:?}",
        exc.done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_with_anti_reflux_off_is_alarmed() {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.sim.with_model(|m| {
        m.inverters[2].settings.insert(reg::PREVENT_REVERSE_FLOW, 0);
    });
    l.run(5.0, |_, _| {}).await;
    let s = serde_json::to_value(l.ems.status().unwrap().as_ref()).unwrap();
    assert_eq!(s["inverters"][2]["alarm"], "inverter_limit_off");
    assert!(
        s["inverters"][1]["alarm"].is_null(),
        "{}",
        s["inverters"][1]
    );
    // The EMS does not change the unit's meter-port role itself.
    l.sim.with_model(|m| {
        assert_eq!(m.inverters[2].setting(reg::PREVENT_REVERSE_FLOW), 0);
        assert!(m.inverters[2].anti_reflux_limit_w().is_none());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_gives_back_own_settings_but_never_switches_export_limiting_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_store(demo_1s(), &dir);
    c.control.on_stop = OnStop::Release;
    let mut l = ClosedLoop::start(c).await.unwrap();
    // The installer left export limiting off and the units in self-use.
    l.sim.with_model(|m| {
        for i in m.inverters.iter_mut() {
            i.settings.insert(reg::APP_MODE, app_mode::SELF_USE);
            i.settings.insert(reg::ANTI_REFLUX_MODE, 0);
            i.settings.insert(reg::ANTI_REFLUX_POWER, 1000);
        }
    });
    l.run(10.0, |_, _| {}).await;
    l.ems.stop().await;
    l.sim.with_model(|m| {
        for i in &m.inverters {
            assert_eq!(i.app_mode(), app_mode::SELF_USE, "own mode back");
            assert_ne!(i.setting(reg::ANTI_REFLUX_MODE), 0, "limiting left on");
            assert_eq!(
                i.setting(reg::ANTI_REFLUX_POWER),
                0,
                "cap at its share of 0 W"
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_and_stop_write_back_the_values_from_before_the_ems() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_store(demo_1s(), &dir);
    c.control.on_stop = OnStop::Release;
    let mut l = ClosedLoop::start(c.clone()).await.unwrap();
    // Pre-EMS values that a zero-export site may keep: self-use, limiting on at 0 ‰.
    l.sim.with_model(|m| {
        for i in m.inverters.iter_mut() {
            i.settings.insert(reg::APP_MODE, app_mode::SELF_USE);
            i.settings.insert(reg::ANTI_REFLUX_MODE, 1);
            i.settings.insert(reg::ANTI_REFLUX_POWER, 0);
        }
    });
    let before = controlled(&l);
    l.run(10.0, |_, _| {}).await;
    l.ems.flush_store(Duration::from_secs(5)).await.unwrap();
    assert!(
        l.sim.with_model(|m| m
            .inverters
            .iter()
            .all(|i| i.app_mode() == app_mode::PASSIVE)),
        "the EMS took over"
    );
    // kill -9: the EMS is gone without a stop; a new one starts on the same store.
    let (ems, _api) = Ems::with_options(l.sim.rewire(&c), l.sim.clock(), EmsOptions::default());
    drop(std::mem::replace(&mut l.ems, ems));
    l.run(10.0, |_, _| {}).await;
    l.ems.stop().await;
    assert_eq!(
        controlled(&l),
        before,
        "the unit's own values, not the EMS's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_unit_with_a_fault_bit_is_brought_under_a_0_w_limit_within_5_s() {
    let c = demo_1s();
    let margin = c.control.grid_margin_w;
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // Little load, every other battery full: only the faulted unit can be turned down. It
    // reports "battery voltage high" and discharges 5 kW on top of its PV.
    l.sim.with_model(|m| {
        m.base_load_w = 500.0;
        m.peak_load_w = 500.0;
        for (k, i) in m.inverters.iter_mut().enumerate() {
            if k == 0 {
                i.fault_words[1] = 1 << 22;
                i.settings
                    .insert(reg::PASSIVE_ENABLE, saj::passive::DISCHARGE);
                i.settings.insert(reg::PASSIVE_BAT_DISCHARGE, 500);
                i.settings.insert(reg::ANTI_REFLUX_POWER, 1000);
            } else {
                i.soc_pct = 100.0;
            }
        }
    });
    let t0 = l.t_s;
    let mut last_over = None;
    l.run(30.0, |t, m| {
        if -m.truth.grid_w.iter().sum::<f64>() > margin {
            last_over = Some(t);
        }
    })
    .await;
    let back_after = last_over.map_or(0.0, |t| t - t0);
    assert!(
        back_after <= 5.0,
        "export over the limit until {back_after:.1} s"
    );
    let status = serde_json::to_value(l.ems.status().unwrap().as_ref()).unwrap();
    assert_eq!(status["inverters"][0]["held"], "faulted");
    assert_eq!(status["inverters"][0]["setpoint"]["battery_w"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_that_never_confirms_passive_mode_gets_bounded_writes_and_an_alarm() {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.sim
        .with_model(|m| m.inverters[0].mirrors_app_mode = false);
    l.run(600.0, |_, _| {}).await;
    let mode_writes = l
        .sim
        .writes()
        .iter()
        .filter(|w| w.device == "inv01" && w.addr == reg::APP_MODE)
        .count();
    println!("AppMode writes to inv01 in 10 minutes: {mode_writes}");
    assert!(
        mode_writes <= 1 + site_ems::io::actuation::CONFIRM_ATTEMPTS as usize,
        "{mode_writes} AppMode writes"
    );
    let status = serde_json::to_value(l.ems.status().unwrap().as_ref()).unwrap();
    assert_eq!(status["inverters"][0]["alarm"], "passive_not_confirmed");
    assert_eq!(status["inverters"][1]["alarm"], serde_json::Value::Null);

    // The alarm holds back re-writes that 0x4022 asks for, not those the registers
    // themselves show: an installer puts the unit in self-use, the read-back sees it.
    l.sim.with_model(|m| {
        m.inverters[0]
            .settings
            .insert(reg::APP_MODE, app_mode::SELF_USE)
    });
    l.run(
        site_ems::io::actuation::READBACK_EVERY.as_secs_f64() + 5.0,
        |_, _| {},
    )
    .await;
    assert_eq!(
        l.sim.with_model(|m| m.inverters[0].app_mode()),
        app_mode::PASSIVE,
        "mode written again after the read-back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_ignoring_its_setpoint_is_not_following_and_the_others_cover() {
    let mut c = demo_1s();
    c.control.follow_after_s = 10.0;
    let margin = c.control.grid_margin_w;
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // inv02 keeps discharging 4 kW whatever it is told.
    l.sim.with_model(|m| {
        let i = &mut m.inverters[1];
        i.battery_w = 4000.0;
        i.ignores_setpoint = true;
    });
    let t0 = l.t_s;
    let mut marked_at = None;
    // Until it is marked the EMS counts on its setpoint; from then on the others cover.
    let mut exc = Excursions::default();
    while l.t_s < t0 + 60.0 {
        l.tick().await;
        let s = serde_json::to_value(l.ems.status().unwrap().as_ref()).unwrap();
        if s["inverters"][1]["held"] == "not_following" {
            marked_at.get_or_insert(l.t_s - t0);
        }
        if marked_at.is_some() {
            exc.observe(l.t_s, l.export_w(), margin);
        }
    }
    exc.finish(l.t_s);
    let marked_at = marked_at.expect("inv02 marked not_following");
    println!(
        "marked not_following after {marked_at:.1} s; then excursions {:?}",
        exc.done
    );
    assert!(marked_at <= 10.0 + 3.0, "marked after {marked_at:.1} s");
    assert!(
        exc.longest_s() <= 2.0,
        "excursions once marked {:?}",
        exc.done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_losing_a_fifth_of_the_writes_keeps_export_excursions_under_2_s() {
    let c = demo_1s();
    let margin = c.control.grid_margin_w;
    let mut proxies = Vec::new();
    let mut l = ClosedLoop::start_adjusted(c, |mut c| {
        // Every inverter's link goes through a proxy that loses 20 % of the write requests.
        for (n, link) in c
            .links
            .iter_mut()
            .filter(|l| l.name.starts_with("sim-inv"))
            .enumerate()
        {
            let host = link.host.as_deref().unwrap_or("127.0.0.1");
            let target = SocketAddr::new(host.parse().expect("ip"), link.port.expect("port"));
            let proxy = LossyProxy::start(target, 0.2, 40 + n as u64);
            link.port = Some(proxy.addr.port());
            proxies.push(proxy);
        }
        c
    })
    .await
    .unwrap();
    assert_eq!(proxies.len(), 10, "every inverter behind a lossy link");
    l.run(30.0, |_, _| {}).await;

    // Five minutes at midday under a 0 W export limit, the load dropping by 5 kW for half a
    // minute every minute: each drop needs a safety decrease through the lossy links.
    let t0 = l.t_s;
    let mut exc = Excursions::default();
    let mut step = 0;
    while l.t_s < t0 + 300.0 {
        let due = ((l.t_s - t0) / 30.0) as i32;
        if due > step {
            step = due;
            let w = if step % 2 == 1 { -5000.0 } else { 0.0 };
            l.sim.with_model(|m| m.load_step_w = w);
        }
        l.tick().await;
        exc.observe(l.t_s, l.export_w(), margin);
    }
    exc.finish(l.t_s);
    let dropped: u64 = proxies.iter().map(|p| p.dropped()).sum();
    let forwarded: u64 = proxies.iter().map(|p| p.forwarded()).sum();
    println!(
        "writes lost {dropped}, delivered {forwarded}; export excursions over {margin} W: {:?}",
        exc.done
    );
    assert!(dropped >= 10, "the proxy lost {dropped} writes");
    assert!(
        exc.longest_s() <= 2.0,
        "export excursions with 20 % of writes lost: {:?}",
        exc.done
    );
}
