//! The guard loop never waits: a slow plan, a burst of demand-response events or a locked
//! store do not hold it up, and a grid meter lost in any way — refusing, hung, frozen —
//! ends in the safe state in time. Closed loops here count the time the EMS spends in I/O
//! as site time, so a stall would show up as an excursion.

#![cfg(feature = "sim")]

mod common;

use std::time::Duration;

use common::{all_healthy, demo_1s, fast_site, Harness};
use serde_json::{json, Value};
use site_ems::config::{DrConfig, SiteConfig, StoreConfig, WorkingMode};
use site_ems::drivers::saj::{app_mode, reg};
use site_ems::runtime::EmsOptions;
use site_ems::sim::lockstep::ClosedLoop;
use site_ems::sim::Behaviour;

fn status(l: &ClosedLoop) -> Value {
    serde_json::to_value(l.ems.status().expect("a cycle has run").as_ref()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_drop_while_a_slow_plan_solves_is_caught_within_2_s() {
    let mut c = demo_1s();
    c.working_mode.mode = WorkingMode::Plan;
    // Lock-step runs minutes of site time per wall second: keep the plan fresh for a day so
    // it is still in force when it arrives.
    if let Some(p) = c.planner.as_mut() {
        p.replan_min = 1440.0;
    }
    // Every solve takes at least 5 s of wall time: in lock-step that is many minutes of
    // site time, and the loop must not wait for any of it.
    let options = EmsOptions {
        plan_delay: Duration::from_secs(5),
    };
    let mut l = ClosedLoop::start_options(c, options).await.unwrap();
    l.run(30.0, |_, _| {}).await;
    assert_eq!(
        status(&l)["plan"]["solving"],
        true,
        "the first plan is solving"
    );
    assert!(l.export_w() <= 0.0, "settled: export {}", l.export_w());

    let r = l.load_step_response(-5000.0, 0.0, 30.0).await;
    let exc = r.excursions;
    let s = status(&l);
    assert_eq!(
        s["plan"]["solving"], true,
        "the drop came while the plan solved"
    );
    let back = r.back_after_s.expect("export came back under the limit");
    assert!(back <= 2.0, "export back under the limit after {back:.1} s");
    assert!(exc.longest_s() <= 2.0, "excursions {:?}", exc.done);
    assert_eq!(s["guard_loop"]["overruns"], 0, "{:#}", s["guard_loop"]);
    let slowest = l.cycle_times_s().iter().fold(0.0f64, |a, b| a.max(*b));
    assert!(slowest < 1.0, "slowest cycle {slowest:.3} s of site time");

    // The plan arrives in the end and is followed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while status(&l)["plan"]["solves"] == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no plan within 60 s"
        );
        l.tick().await;
    }
    l.run(2.0, |_, _| {}).await;
    assert_eq!(status(&l)["plan"]["following"], true);
}

const TOKEN: &str = "guard-loop-token";

fn dr_site() -> SiteConfig {
    let mut c = fast_site("sites/demo.yaml");
    c.working_mode.mode = WorkingMode::Plan;
    c.dr = Some(DrConfig {
        token: Some(TOKEN.into()),
        // A burst of 200 events in 9 s is what these tests are about: room for it.
        max_events: 1000,
        max_events_per_min: 1000,
        ..Default::default()
    });
    c
}

async fn post(h: &Harness, body: Value) -> u16 {
    h.post_event(Some(TOKEN), body.to_string()).await.0
}

fn event(id: &str, start_in_s: i64, minutes: i64, export_limit_w: f64, now: &str) -> Value {
    let now = chrono::DateTime::parse_from_rfc3339(now).unwrap();
    let start = now + chrono::Duration::seconds(start_in_s);
    json!({
        "id": id,
        "start": start.to_rfc3339(),
        "end": (start + chrono::Duration::minutes(minutes)).to_rfc3339(),
        "export_limit_w": export_limit_w,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_dr_events_in_10_s_give_a_handful_of_solves_and_no_slow_cycle() {
    let h = Harness::start(dr_site()).await;
    let s = h
        .wait_for(Duration::from_secs(20), "a first plan", |s| {
            all_healthy(s) && s["plan"]["solves"].as_u64() >= Some(1)
        })
        .await;
    let now = s["time"].as_str().unwrap().to_string();
    let started = tokio::time::Instant::now();
    for k in 0..200 {
        let body = event(&format!("burst-{k}"), 60 + k, 30, 1000.0 + k as f64, &now);
        assert_eq!(post(&h, body).await, 201, "event {k}");
        // 200 events spread over 9 s.
        tokio::time::sleep_until(started + Duration::from_millis(45 * (k as u64 + 1))).await;
    }
    let posted_in = started.elapsed();
    assert!(posted_in <= Duration::from_secs(10), "{posted_in:?}");
    // Let the last change settle into one more plan.
    let s = h
        .wait_for(Duration::from_secs(30), "the burst planned for", |s| {
            s["plan"]["solving"] == false
                && s["plan"]["error"].is_null()
                && s["dr"]["events"] == 200
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = h.status().await.unwrap_or(s);
    let solves = s["plan"]["solves"].as_u64().unwrap();
    let max_ms = s["guard_loop"]["max_ms"].as_f64().unwrap();
    println!("200 events posted in {posted_in:?}: {solves} solves, slowest cycle {max_ms:.1} ms");
    assert!(
        solves <= 6,
        "a handful of solves, not one per event: {solves}"
    );
    assert!(max_ms <= 400.0, "no cycle over 2 × 200 ms: {max_ms:.1} ms");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_locked_for_10_s_delays_writes_but_not_the_loop_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ems.sqlite");
    let mut c = dr_site();
    c.working_mode.mode = WorkingMode::SelfConsumption;
    c.planner = None;
    // 30 site minutes a real minute: history rows come every 2 s.
    c.simulation.time_factor = 30.0;
    c.control.stale_after_s = 10.0;
    c.control.fail_safe_after_s = 10.0;
    c.store = Some(StoreConfig {
        path: path.display().to_string(),
    });
    let h = Harness::start(c).await;
    let s = h
        .wait_for(Duration::from_secs(20), "a healthy site", all_healthy)
        .await;
    let now = s["time"].as_str().unwrap().to_string();
    assert_eq!(post(&h, event("before", 30, 3, 5000.0, &now)).await, 201);

    // Another process holds the file for 10 s.
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let holder_path = path.clone();
    let holder = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&holder_path).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let _ = locked_tx.send(());
        std::thread::sleep(Duration::from_secs(10));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.await.unwrap();
    let before = h.status().await.unwrap();
    let locked_at = tokio::time::Instant::now();
    // An event cannot be put on disk: it is refused, not accepted and lost.
    assert_eq!(post(&h, event("during", 30, 3, 5000.0, &now)).await, 503);
    let during = h.status().await.unwrap();
    let cycles = during["cycle"].as_u64().unwrap() - before["cycle"].as_u64().unwrap();
    let expected = locked_at.elapsed().as_secs_f64() / 0.2;
    assert!(
        cycles as f64 >= 0.7 * expected,
        "{cycles} cycles in {:?}",
        locked_at.elapsed()
    );
    holder.await.unwrap();
    let locked_for = locked_at.elapsed();
    assert_eq!(post(&h, event("after", 30, 3, 5000.0, &now)).await, 201);
    let s = h.status().await.unwrap();
    assert!(
        s["guard_loop"]["max_ms"].as_f64().unwrap() <= 400.0,
        "{:#}",
        s["guard_loop"]
    );

    // Once the lock is gone every history minute and every state change reaches the file.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let store = site_ems::store::Store::open(&path).unwrap();
        let states: Vec<(String, String)> = store
            .dr_events()
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.state))
            .collect();
        let minutes: Vec<i64> = {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let mut q = conn
                .prepare("SELECT minute FROM samples ORDER BY minute")
                .unwrap();
            q.query_map([], |r| r.get(0))
                .unwrap()
                .map(|m| m.unwrap())
                .collect()
        };
        let gapless = minutes.windows(2).all(|w| w[1] - w[0] == 60);
        let ended = states
            .iter()
            .any(|(id, st)| id == "before" && st == "ended");
        let done = gapless
            && minutes.len() as f64 >= locked_for.as_secs_f64() / 2.0
            && ended
            && states.iter().any(|(id, _)| id == "after")
            && !states.iter().any(|(id, _)| id == "during");
        if done {
            println!(
                "after a {locked_for:?} lock: {} history minutes, no gap; events {states:?}",
                minutes.len()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store incomplete: minutes {minutes:?}, events {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    h.stop().await;
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

/// Break the grid meter with `behaviour` (after `then`, which may change the site), and
/// return how long it took until every unit was in the safe state; check the reason status
/// gives and that control resumes once the meter is back.
async fn meter_fault(behaviour: Behaviour, reason: &str, then: impl FnOnce(&ClosedLoop)) -> f64 {
    let mut l = ClosedLoop::start(demo_1s()).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    assert!(!safe_state(&l), "midday: the fleet is producing");
    let t0 = l.t_s;
    l.sim.set_behaviour("grid", behaviour);
    then(&l);
    let mut safe_at = None;
    while l.t_s < t0 + 25.0 {
        l.tick().await;
        if safe_state(&l) {
            safe_at.get_or_insert(l.t_s - t0);
        }
    }
    let s = status(&l);
    assert_eq!(s["grid"]["health"], "stale", "{:#}", s["grid"]);
    assert_eq!(s["grid"]["reason"], reason, "{:#}", s["grid"]);
    assert_eq!(s["control"]["fail_safe"], true);
    assert!(safe_state(&l), "still safe while the meter is broken");

    l.sim.set_behaviour("grid", Behaviour::Normal);
    let deadline = l.t_s + 30.0;
    let resumed = |l: &ClosedLoop| l.ems.last_decision().is_some_and(|d| !d.fail_safe);
    while !resumed(&l) || safe_state(&l) {
        assert!(
            l.t_s < deadline,
            "normal control resumed after the meter came back"
        );
        l.tick().await;
    }
    assert_eq!(status(&l)["grid"]["reason"], Value::Null);
    l.assert_clean_writes();
    safe_at.expect("every inverter in the safe state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_grid_meter_ends_in_the_safe_state_within_5_s() {
    // The meter's port accepts requests and never answers: every read waits its timeout.
    let safe_at = meter_fault(Behaviour::Silent, "timeout", |_| {}).await;
    assert!(safe_at <= 5.0, "safe after {safe_at:.1} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_grid_meter_ends_in_the_safe_state_within_frozen_after_plus_5_s() {
    // A gateway keeps serving its last values while a cloud halves the fleet's PV: the
    // fleet's output moves, the meter does not.
    let safe_at = meter_fault(Behaviour::Frozen, "frozen", |l| {
        l.sim.with_model(|m| {
            for i in m.inverters.iter_mut() {
                i.pv_peak_w *= 0.5;
            }
        })
    })
    .await;
    let frozen_after = demo_1s().control.frozen_after_s;
    assert!(
        safe_at <= frozen_after + 5.0,
        "safe after {safe_at:.1} s (frozen_after_s {frozen_after})"
    );
}
