//! The read path end to end: the simulated site over real Modbus TCP, the EMS polling it,
//! and what `GET /api/v1/status` shows when devices work, stop, or answer badly.

#![cfg(feature = "sim")]

mod common;

use std::time::Duration;

use common::{all_healthy, fast_site, inverter, Harness};
use serde_json::Value;
use site_ems::config::Phase;
use site_ems::sim::Behaviour;

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_balances_power_on_every_phase() {
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(Duration::from_secs(10), "all devices healthy", all_healthy)
        .await;

    // Freeze simulated time so every device's registers describe the same instant, then
    // wait for a cycle that read them all after the freeze.
    h.sim.set_paused(true);
    let frozen_cycle = f(&h.status().await.unwrap()["cycle"]);
    let s = h
        .wait_for(Duration::from_secs(5), "two cycles after the freeze", |s| {
            f(&s["cycle"]) >= frozen_cycle + 2.0 && all_healthy(s)
        })
        .await;
    let truth = h.sim.with_model(|m| m.truth.clone());
    for phase in Phase::ALL {
        let k = phase.index();
        let grid = f(&s["grid"]["phases"][k]["power_w"]);
        let inverters: f64 = s["inverters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| f(&i["phases"][k]["power_w"]))
            .sum();
        // grid = load − inverter output − AC-coupled PV, to within register rounding.
        let balance = truth.load_w[k] - inverters - truth.ac_pv_w[k];
        assert!(
            (grid - balance).abs() < 10.0,
            "{phase:?}: grid {grid} W, load {} W − inverters {inverters} W = {balance} W",
            truth.load_w[k]
        );
    }
    // The control loop reports what it did.
    assert_eq!(s["control"]["fail_safe"], false);
    assert_eq!(s["control"]["active_mode"], "self_consumption");
    for i in s["inverters"].as_array().unwrap() {
        assert!(i["setpoint"]["output_cap_w"].as_f64().is_some(), "{i}");
    }
    let total: f64 = (0..3).map(|k| f(&s["grid"]["phases"][k]["power_w"])).sum();
    assert!((total - f(&s["grid"]["power_w"])).abs() < 1.0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_inverter_goes_stale_and_the_rest_stay_healthy() {
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(Duration::from_secs(10), "all devices healthy", all_healthy)
        .await;

    assert!(h.sim.stop_device("inv03"));
    let s = h
        .wait_for(Duration::from_secs(5), "inv03 stale", |s| {
            inverter(s, "inv03")["health"] == "stale"
        })
        .await;
    let inv03 = inverter(&s, "inv03");
    assert!(
        inv03["ac_power_w"].is_null(),
        "a stale unit's values are not shown as fresh"
    );
    assert!(inv03["soc_pct"].is_null());
    assert!(inv03["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(s["grid"]["health"], "ok");
    for i in s["inverters"].as_array().unwrap() {
        if i["id"] != "inv03" {
            assert_eq!(i["health"], "ok", "{i}");
        }
    }
    assert_eq!(s["fleet"]["inverters_ok"], 9);

    // Plugged back in: healthy again.
    h.sim.restart_device("inv03").await.unwrap();
    h.wait_for(Duration::from_secs(10), "inv03 healthy again", |s| {
        inverter(s, "inv03")["health"] == "ok"
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_garbage_and_silence_mark_devices_unhealthy_with_the_reason() {
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(Duration::from_secs(10), "all devices healthy", all_healthy)
        .await;

    h.sim.set_behaviour("inv02", Behaviour::Garbage);
    h.sim.set_behaviour("inv04", Behaviour::Exception(0x04));
    h.sim.set_behaviour("inv06", Behaviour::Silent);
    let s = h
        .wait_for(Duration::from_secs(8), "three units stale", |s| {
            ["inv02", "inv04", "inv06"]
                .iter()
                .all(|id| inverter(s, id)["health"] == "stale")
        })
        .await;
    let err = |id| {
        inverter(&s, id)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(err("inv02").contains("bad data"), "{}", err("inv02"));
    assert!(err("inv04").contains("exception 0x04"), "{}", err("inv04"));
    assert!(err("inv06").contains("no answer"), "{}", err("inv06"));
    for id in [
        "inv01", "inv03", "inv05", "inv07", "inv08", "inv09", "inv10",
    ] {
        assert_eq!(inverter(&s, id)["health"], "ok", "{id} unaffected");
    }
    assert_eq!(s["grid"]["health"], "ok");

    for id in ["inv02", "inv04", "inv06"] {
        h.sim.set_behaviour(id, Behaviour::Normal);
    }
    h.wait_for(
        Duration::from_secs(10),
        "all healthy after recovery",
        all_healthy,
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_bits_show_as_named_faults() {
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(Duration::from_secs(10), "all devices healthy", all_healthy)
        .await;
    // MFaultMSG bit 22: battery voltage high.
    h.sim
        .with_model(|m| m.inverter_mut("inv05").unwrap().fault_words[1] = 1 << 22);
    let s = h
        .wait_for(Duration::from_secs(5), "inv05 faulted", |s| {
            inverter(s, "inv05")["health"] == "faulted"
        })
        .await;
    assert_eq!(
        inverter(&s, "inv05")["faults"],
        serde_json::json!(["battery_voltage_high"])
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_phase_home_reads_both_meters() {
    let h = Harness::start(fast_site("sites/home-1ph.yaml")).await;
    let s = h
        .wait_for(Duration::from_secs(10), "home site healthy", |s| {
            all_healthy(s)
                && s["meters"]
                    .as_array()
                    .is_some_and(|m| m.iter().all(|m| m["health"] == "ok"))
        })
        .await;
    let solar = s["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "pv")
        .unwrap();
    // Late morning in June: the AC-coupled solar inverter generates, shown as + generation.
    assert!(f(&solar["power_w"]) > 100.0, "{solar}");
    assert_eq!(s["grid"]["phases"].as_array().unwrap().len(), 1);
    h.stop().await;
}
