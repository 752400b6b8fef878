//! Demand response: DRM modes on the closed loop over real Modbus, events over HTTP with
//! authentication and validation, and events that survive `kill -9`.

#![cfg(feature = "sim")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{fast_site, Harness};
use serde_json::{json, Value};
use site_ems::config::{DrConfig, SiteConfig};
use site_ems::dr::{DrCommand, DrEvent};
use site_ems::drivers::saj::{passive, reg};
use site_ems::sim::lockstep::ClosedLoop;

/// Demo site at sunny midday with full batteries and a generous export limit: the fleet
/// pushes its PV out, so generation limits show.
fn exporting_demo() -> SiteConfig {
    let mut c = fast_site("sites/demo.yaml");
    c.control.cycle_ms = 1000;
    c.control.stale_after_s = 3.0;
    c.export_limit = site_ems::config::GridLimitConfig::TotalPower { limit_w: 100_000.0 };
    c.simulation.initial_soc_pct = 100.0;
    c.simulation.load_noise_pct = 0.0;
    c
}

fn event(id: &str, start: DateTime<Utc>, command: DrCommand) -> DrEvent {
    DrEvent {
        id: id.into(),
        start,
        end: start + chrono::Duration::hours(1),
        priority: 0,
        command,
        source: "test".into(),
    }
}

async fn post_and_watch(
    l: &mut ClosedLoop,
    command: DrCommand,
    ok: impl Fn(&ClosedLoop) -> bool,
) -> f64 {
    l.run(20.0, |_, _| {}).await;
    let now = l.sim.with_model(|m| m.now);
    l.ems
        .dr_book()
        .lock()
        .add(event("e1", now, command))
        .unwrap();
    let t0 = l.t_s;
    let mut held_since = None;
    while l.t_s < t0 + 10.0 {
        l.tick().await;
        if ok(l) {
            held_since.get_or_insert(l.t_s - t0);
        } else {
            held_since = None;
        }
    }
    held_since.expect("the constraint holds and keeps holding")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drm5_stops_generation_and_export_within_2_s() {
    let mut l = ClosedLoop::start(exporting_demo()).await.unwrap();
    let after = post_and_watch(&mut l, DrCommand::Drm(5), |l| {
        l.export_w() <= 0.0
            && l.sim
                .with_model(|m| m.inverters.iter().all(|i| i.ac_w <= 1.0))
    })
    .await;
    assert!(after <= 2.0, "DRM5 held after {after:.1} s");
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drm6_holds_generation_to_half_of_rating_within_2_s() {
    let mut l = ClosedLoop::start(exporting_demo()).await.unwrap();
    assert!(l
        .sim
        .with_model(|m| m.inverters.iter().all(|i| i.ac_w > 0.0)));
    let after = post_and_watch(&mut l, DrCommand::Drm(6), |l| {
        l.sim
            .with_model(|m| m.inverters.iter().all(|i| i.ac_w <= 0.5 * i.rated_w + 1.0))
    })
    .await;
    assert!(after <= 2.0, "DRM6 held after {after:.1} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drm0_puts_every_inverter_in_standby() {
    let mut l = ClosedLoop::start(exporting_demo()).await.unwrap();
    let after = post_and_watch(&mut l, DrCommand::Drm(0), |l| {
        l.sim.with_model(|m| {
            m.inverters.iter().all(|i| {
                i.setting(reg::PASSIVE_ENABLE) == passive::STANDBY
                    && i.setting(reg::ANTI_REFLUX_POWER) == 0
                    && i.battery_w.abs() < 1.0
                    && i.ac_w.abs() < 1.0
            })
        })
    })
    .await;
    assert!(after <= 2.0, "standby after {after:.1} s");
    assert_eq!(
        l.ems.last_decision().unwrap().binding,
        Some(site_ems::control::Binding::Standby)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ripple_step_30_pct_caps_feed_in() {
    let mut l = ClosedLoop::start(exporting_demo()).await.unwrap();
    // 30 % of the fleet's 100 kW.
    let after = post_and_watch(&mut l, DrCommand::RipplePct(30.0), |l| {
        l.export_w() <= 30_000.0
    })
    .await;
    assert!(after <= 2.0, "feed-in under 30 % after {after:.1} s");
    assert!(
        l.export_w() > 20_000.0,
        "and no lower than it needs: {}",
        l.export_w()
    );
}

const TOKEN: &str = "s3cret-token";

fn dr_site() -> SiteConfig {
    let mut c = exporting_demo();
    c.control.cycle_ms = 200;
    c.dr = Some(DrConfig {
        token: Some(TOKEN.into()),
        ..Default::default()
    });
    c
}

async fn post(h: &Harness, token: Option<&str>, body: String) -> (u16, Value) {
    h.post_event(token, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_events_need_the_token_are_validated_and_take_effect_in_their_window() {
    let h = Harness::start(dr_site()).await;
    let s = h
        .wait_for(Duration::from_secs(10), "healthy", common::all_healthy)
        .await;
    let now: DateTime<Utc> = s["time"].as_str().unwrap().parse().unwrap();
    let ev = |id: &str, start: DateTime<Utc>, secs: i64, extra: Value| {
        let mut v =
            json!({"id": id, "start": start, "end": start + chrono::Duration::seconds(secs)});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v.to_string()
    };
    let start = now + chrono::Duration::seconds(3);
    let good = ev("limit-1", start, 4, json!({"export_limit_w": 5000}));

    // Refused without changing anything.
    assert_eq!(post(&h, None, good.clone()).await.0, 401);
    assert_eq!(post(&h, Some("wrong"), good.clone()).await.0, 401);
    let (code, body) = post(&h, Some(TOKEN), "{not json".into()).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("bad event JSON"));
    let (code, body) = post(&h, Some(TOKEN), ev("x", start, 4, json!({"drm": 9}))).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("0–8"), "{body}");
    let (code, body) = post(
        &h,
        Some(TOKEN),
        ev("x", start, 4, json!({"drm": 5, "export_limit_w": 1})),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("exactly one"),
        "{body}"
    );
    let (code, _) = post(&h, Some(TOKEN), ev("x", start, -4, json!({"drm": 5}))).await;
    assert_eq!(code, 400);
    let list = h.dr_events(TOKEN).await;
    assert_eq!(list, json!([]), "nothing was accepted");

    // Accepted once; a second delivery is a conflict.
    assert_eq!(post(&h, Some(TOKEN), good.clone()).await.0, 201);
    assert_eq!(post(&h, Some(TOKEN), good).await.0, 409);

    // Not yet in force; in force at its start; gone at its end.
    let active = |s: &Value| {
        s["dr"]["constraints"]["active"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "limit-1"))
    };
    assert!(!active(&h.status().await.unwrap()));
    let s = h
        .wait_for(Duration::from_secs(8), "event in force", active)
        .await;
    let t: DateTime<Utc> = s["time"].as_str().unwrap().parse().unwrap();
    assert!(t >= start, "not before its start");
    h.wait_for(Duration::from_secs(8), "export held to 5 kW", |s| {
        s["grid"]["power_w"].as_f64().is_some_and(|g| -g <= 5000.0)
    })
    .await;
    let s = h
        .wait_for(Duration::from_secs(10), "event over", |s| !active(s))
        .await;
    let t: DateTime<Utc> = s["time"].as_str().unwrap().parse().unwrap();
    assert!(
        t >= start + chrono::Duration::seconds(4),
        "not before its end"
    );

    // Cancel by id.
    assert_eq!(
        post(&h, Some(TOKEN), ev("c-1", now, 3600, json!({"drm": 6})))
            .await
            .0,
        201
    );
    let r = h
        .client
        .delete(format!("{}/api/v1/dr/events/c-1", h.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .client
        .delete(format!("{}/api/v1/dr/events/c-1", h.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    h.stop().await;
}

/// `ems run --simulate` on a copy of the demo site with a store; returns the child and base URL.
fn start_ems(site: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args([
            "run",
            &site.display().to_string(),
            "--simulate",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("EMS_DR_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("ems printed its address").unwrap();
        if let Some(a) = line.split("api listening on ").nth(1) {
            break a.trim().to_string();
        }
    };
    (child, base)
}

fn blocking_status(base: &str) -> Option<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let r = reqwest::get(format!("{base}/api/v1/status")).await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    })
}

#[test]
fn kill_9_during_an_event_restart_enforces_it_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.yaml");
    let text = std::fs::read_to_string("sites/demo.yaml").unwrap()
        + &format!(
            // The demo has `dr: { token_env: EMS_DR_TOKEN }` already.
            "store:\n  path: {}\n",
            dir.path().join("ems.sqlite").display()
        );
    std::fs::write(&site, text).unwrap();

    let (mut ems, base) = start_ems(&site);
    let status = loop {
        if let Some(s) = blocking_status(&base) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let now: DateTime<Utc> = status["time"].as_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let code = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{base}/api/v1/dr/events"))
            .bearer_auth(TOKEN)
            .json(&json!({"id": "drm5-kill", "start": now - chrono::Duration::minutes(1), "end": now + chrono::Duration::hours(2), "drm": 5}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(code, 201);
    loop {
        if blocking_status(&base).is_some_and(|s| {
            s["control"]["binding"] == "export_limit"
                || s["dr"]["constraints"]["generation_pct"] == 0.0
        }) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ems.kill().unwrap(); // SIGKILL: no clean shutdown
    ems.wait().unwrap();

    let (mut ems, base) = start_ems(&site);
    // The very first status already carries the event: it was loaded before the first cycle.
    let first = loop {
        if let Some(s) = blocking_status(&base) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        first["dr"]["constraints"]["active"],
        json!(["drm5-kill"]),
        "cycle {}",
        first["cycle"]
    );
    assert_eq!(first["dr"]["constraints"]["generation_pct"], 0.0);
    let list: Value = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{base}/api/v1/dr/events"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "none lost, none duplicated: {list}"
    );
    assert_eq!(list[0]["id"], "drm5-kill");
    ems.kill().unwrap();
    ems.wait().unwrap();
}

fn with_contacts() -> SiteConfig {
    let mut c = exporting_demo();
    c.links.push(site_ems::config::LinkConfig {
        name: "dio".into(),
        kind: site_ems::config::LinkKind::Tcp,
        host: Some("192.168.1.90".into()),
        port: Some(502),
        device: None,
        baud: None,
        parity: Default::default(),
        stop_bits: None,
        timeout_ms: None,
        gap_ms: None,
    });
    c.dr = Some(DrConfig {
        contacts: Some(site_ems::config::ContactsConfig {
            link: "dio".into(),
            unit_id: 5,
            drm_inputs: Some([0, 1, 2, 3, 4, 5, 6, 7, 8]),
            ripple_inputs: Some([10, 11, 12, 13]),
        }),
        ..Default::default()
    });
    c
}

/// Seconds until `ok` holds (and keeps holding for the rest of `window` s), ticking the loop.
async fn holds_after(
    l: &mut ClosedLoop,
    window: f64,
    ok: impl Fn(&ClosedLoop) -> bool,
) -> Option<f64> {
    let t0 = l.t_s;
    let mut since = None;
    while l.t_s < t0 + window {
        l.tick().await;
        if ok(l) {
            since.get_or_insert(l.t_s - t0);
        } else {
            since = None;
        }
    }
    since
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dred_contact_drm5_applies_while_closed() {
    let mut l = ClosedLoop::start(with_contacts()).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    l.sim.set_contact(5, true);
    let no_generation = |l: &ClosedLoop| {
        l.sim
            .with_model(|m| m.inverters.iter().all(|i| i.ac_w <= 1.0))
    };
    let after = holds_after(&mut l, 8.0, no_generation)
        .await
        .expect("DRM5 from the contact");
    assert!(after <= 2.0, "DRM5 held after {after:.1} s");
    l.sim.set_contact(5, false);
    let back = holds_after(&mut l, 10.0, |l| l.export_w() > 10_000.0).await;
    assert!(back.is_some(), "generation resumes when the contact opens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ripple_pulse_30_pct_is_latched_after_it_ends() {
    let mut l = ClosedLoop::start(with_contacts()).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    assert!(
        l.export_w() > 40_000.0,
        "exporting before the step: {}",
        l.export_w()
    );
    // A 1.5 s pulse on the 30 % input; from its start, feed-in must be capped within 2 s and
    // stay capped for 20 s after the pulse has ended.
    let t0 = l.t_s;
    l.sim.set_contact(12, true);
    let mut since = None;
    while l.t_s < t0 + 21.5 {
        if l.t_s >= t0 + 1.5 {
            l.sim.set_contact(12, false);
        }
        l.tick().await;
        if l.export_w() <= 30_000.0 {
            since.get_or_insert(l.t_s - t0);
        } else {
            since = None;
        }
    }
    let after = since.expect("feed-in capped and latched");
    assert!(after <= 2.0, "capped {after:.1} s after the pulse started");
    assert!(
        l.ems
            .status()
            .unwrap()
            .dr
            .as_ref()
            .unwrap()
            .constraints
            .export_limit_w
            == Some(30_000.0)
    );
    // The 100 % pulse releases it.
    l.sim.set_contact(10, true);
    l.run(1.0, |_, _| {}).await;
    l.sim.set_contact(10, false);
    let released = holds_after(&mut l, 10.0, |l| l.export_w() > 40_000.0).await;
    assert!(released.is_some(), "100 % step releases the cap");
}

/// A latched ripple-control step is the grid operator's: an aggregator's cancel over MQTT
/// is refused with a reason, and the cap stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_cancel_cannot_lift_a_ripple_control_step() {
    use rumqttc::QoS;
    let broker = common::broker::Mosquitto::start();
    let mut c = with_contacts();
    if let Some(d) = c.dr.as_mut() {
        d.mqtt = Some(site_ems::config::MqttConfig {
            heartbeat_s: 600.0,
            telemetry_s: 60.0,
            groups_prefix: "fleet/groups".into(),
            ..site_ems::config::MqttConfig::plain("127.0.0.1", broker.port, "fleet/site-1")
        });
    }
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // A 30 % pulse latches the step.
    l.sim.set_contact(12, true);
    l.run(1.5, |_, _| {}).await;
    l.sim.set_contact(12, false);
    l.run(3.0, |_, _| {}).await;
    let ripple = l
        .ems
        .dr_book()
        .lock()
        .list()
        .into_iter()
        .find(|e| e.event.source == "ripple")
        .expect("the step is latched");
    let id = ripple.event.id.clone();

    let (client, mut acks) =
        common::broker::aggregator(broker.port, "aggregator", &["fleet/site-1/dr/ack"]).await;
    client
        .publish(
            "fleet/site-1/dr/events",
            QoS::AtLeastOnce,
            false,
            json!({ "cancel": id }).to_string(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (_, v) = tokio::time::timeout(left, acks.recv())
            .await
            .expect("a refusal on the ack topic")
            .expect("the aggregator is listening");
        if v["id"] == id.as_str() {
            break v;
        }
    };
    assert_eq!(refusal["status"], "rejected", "{refusal}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("grid operator"),
        "{refusal}"
    );
    // Still latched, still capping feed-in.
    l.run(3.0, |_, _| {}).await;
    assert!(
        l.ems.dr_book().lock().get(&id).is_some(),
        "the step stays in the book"
    );
    assert!(
        l.export_w() <= 30_000.0,
        "feed-in still capped: {}",
        l.export_w()
    );
    // Over HTTP neither: the API cancels as `http`.
    let http = l.ems.dr_book().cancel(&id, "http").await;
    assert!(
        matches!(http, Err(site_ems::dr::book::BookError::Forbidden(_))),
        "{http:?}"
    );
}

/// The README's demand-response example, as printed, against the demo site with
/// `EMS_DR_TOKEN` set: the event is accepted and in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_dr_example_works_on_the_demo() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = &readme[readme
        .find("Try it on the demo")
        .expect("the README's DR example")..];
    let token = section
        .split("EMS_DR_TOKEN=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the token in the start command");
    let body = section
        .split("-d '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("the curl body");
    // The only test that sets it; the demo site reads the token from it at start.
    std::env::set_var("EMS_DR_TOKEN", token);
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(
        Duration::from_secs(20),
        "a healthy site",
        common::all_healthy,
    )
    .await;
    let (code, reply) = post(&h, Some(token), body.to_string()).await;
    assert_eq!(code, 201, "{reply}");
    let id = serde_json::from_str::<Value>(body).unwrap()["id"].clone();
    h.wait_for(Duration::from_secs(5), "the event in force", |s| {
        s["dr"]["constraints"]["export_limit_w"] == 0.0
            && s["dr"]["constraints"]["active"]
                .as_array()
                .is_some_and(|a| a.contains(&id))
    })
    .await;

    // Beyond what the fleet can do: refused, naming the range.
    let too_much = json!({"id": "huge", "start": "2026-06-21T11:00:00Z",
                          "end": "2026-06-21T12:00:00Z", "fleet_battery_w": 1e12});
    let (code, reply) = post(&h, Some(token), too_much.to_string()).await;
    assert_eq!(code, 400, "{reply}");
    let why = reply["error"].as_str().unwrap_or_default();
    assert!(why.contains("100000 W (discharge)"), "{reply}");

    // Beyond the grid connection (the demo's main fuse: 100 A × 230 V × 3 = 69 kW): refused.
    for (field, v) in [("export_limit_w", 1e9), ("import_limit_w", 70_000.0)] {
        let body = json!({"id": format!("beyond-{field}"), "start": "2026-06-21T11:00:00Z",
                          "end": "2026-06-21T12:00:00Z", field: v});
        let (code, reply) = post(&h, Some(token), body.to_string()).await;
        assert_eq!(code, 400, "{field}: {reply}");
        let why = reply["error"].as_str().unwrap_or_default();
        assert!(why.contains("at most 69000 W"), "{reply}");
    }
    h.stop().await;
}
