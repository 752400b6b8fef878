//! Aggregators at fleet scale, through a real mosquitto: sites that share a name share a
//! broker without taking each other's connection, one publish on a group's topic reaches
//! every member, acks survive a broker outage longer than the client's queue, the link
//! needs TLS and a login, a grid operator's input cannot be lifted over MQTT, and the
//! book's intake is bounded.

#![cfg(feature = "sim")]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::broker::{LinkCut, Mosquitto};
use common::{fast_site, Harness};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};
use site_ems::config::{DrConfig, MqttConfig, SiteConfig};
use tokio::sync::mpsc;

const TOKEN: &str = "fleet-token";

fn mqtt(port: u16, prefix: &str) -> MqttConfig {
    MqttConfig {
        groups: vec!["north".into()],
        groups_prefix: "fleet/groups".into(),
        heartbeat_s: 60.0,
        telemetry_s: 1.0,
        ..MqttConfig::plain("127.0.0.1", port, prefix)
    }
}

fn site(m: MqttConfig) -> SiteConfig {
    let mut c = fast_site("sites/demo.yaml");
    c.export_limit = site_ems::config::GridLimitConfig::TotalPower { limit_w: 100_000.0 };
    c.simulation.initial_soc_pct = 100.0;
    c.simulation.load_noise_pct = 0.0;
    c.dr = Some(DrConfig {
        token: Some(TOKEN.into()),
        mqtt: Some(m),
        ..Default::default()
    });
    c
}

/// An aggregator on the broker: hears every site's acks.
async fn aggregator(
    port: u16,
    id: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    common::broker::aggregator(port, id, &["fleet/+/dr/ack"]).await
}

fn now_of(s: &Value) -> DateTime<Utc> {
    s["time"].as_str().unwrap().parse().unwrap()
}

fn connected(s: &Value) -> bool {
    s["dr"]["mqtt_connected"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_of_one_name_keep_their_connections_and_both_obey_a_group_event() {
    let broker = Mosquitto::start();
    let (a, b) = (
        Harness::start(site(mqtt(broker.port, "fleet/a"))).await,
        Harness::start(site(mqtt(broker.port, "fleet/b"))).await,
    );
    let (client, mut acks) = aggregator(broker.port, "aggregator").await;
    for h in [&a, &b] {
        h.wait_for(
            Duration::from_secs(10),
            "connected to the broker",
            connected,
        )
        .await;
    }
    // With one client id between them, each connect would throw the other off: 30 s of
    // polling would see one of them down.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < until {
        for (name, h) in [("a", &a), ("b", &b)] {
            let s = h.status().await.expect("status");
            assert!(
                connected(&s),
                "site {name} lost its connection: {}",
                s["dr"]
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = now_of(&a.status().await.unwrap());
    let event = json!({"id": "north-0", "start": now, "end": now + chrono::Duration::hours(1),
                       "export_limit_w": 0});
    client
        .publish(
            "fleet/groups/north/dr/events",
            QoS::AtLeastOnce,
            false,
            event.to_string(),
        )
        .await
        .unwrap();
    for h in [&a, &b] {
        h.wait_for(Duration::from_secs(10), "the group event binds", |s| {
            s["dr"]["constraints"]["export_limit_w"] == 0.0
                && s["grid"]["power_w"].as_f64().is_some_and(|g| g >= -200.0)
        })
        .await;
    }
    // Each site acknowledges on its own topic, naming itself.
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some((topic, v))) = tokio::time::timeout(left, acks.recv()).await else {
            panic!("accepted acks from both sites, got {seen:?}");
        };
        if v["id"] == "north-0" && v["status"] == "accepted" {
            seen.insert(v["site"].as_str().unwrap_or("?").to_string(), topic);
        }
    }
    assert_eq!(seen.get("a").map(String::as_str), Some("fleet/a/dr/ack"));
    assert_eq!(seen.get("b").map(String::as_str), Some("fleet/b/dr/ack"));
    a.stop().await;
    b.stop().await;
}

async fn post(h: &Harness, body: Value) -> u16 {
    h.post_event(Some(TOKEN), body.to_string()).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_held_through_a_broker_outage_all_arrive_once_after_it() {
    let broker = Mosquitto::start();
    let cut = LinkCut::start(broker.port);
    let mut c = site(mqtt(cut.port, "fleet/a"));
    if let Some(d) = c.dr.as_mut() {
        d.max_events = 1000;
        d.max_events_per_min = 1000;
    }
    let h = Harness::start(c).await;
    let (_client, mut acks) = aggregator(broker.port, "aggregator").await;
    h.wait_for(Duration::from_secs(10), "connected", connected)
        .await;

    // The broker is gone, as the site sees it, while 300 events arrive over HTTP: more
    // acks than rumqttc's request queue (256) holds.
    cut.cut();
    h.wait_for(Duration::from_secs(10), "link down", |s| !connected(s))
        .await;
    let cycles_before = h.status().await.unwrap()["cycle"].clone();
    let now = now_of(&h.status().await.unwrap());
    let n = 300;
    for k in 0..n {
        let start = now + chrono::Duration::hours(1);
        let event = json!({"id": format!("ev-{k}"), "start": start,
                           "end": start + chrono::Duration::hours(1), "export_limit_w": 50_000});
        assert_eq!(post(&h, event).await, 201, "event {k}");
    }
    let before = cycles_before.as_u64().unwrap();
    let s = h
        .wait_for(
            Duration::from_secs(5),
            "the guard loop keeps cycling",
            |s| s["cycle"].as_u64().is_some_and(|c| c >= before + 5),
        )
        .await;
    assert!(!connected(&s));

    cut.restore();
    let mut count: HashMap<String, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some((_, v))) = tokio::time::timeout(left, acks.recv()).await else {
            panic!(
                "{} of {n} accepted acks arrived after the outage",
                count.len()
            );
        };
        if v["status"] == "accepted" {
            *count
                .entry(v["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    // Anything sent twice would follow within moments.
    while let Ok(Some((_, v))) = tokio::time::timeout(Duration::from_secs(2), acks.recv()).await {
        if v["status"] == "accepted" {
            *count
                .entry(v["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "acks sent twice: {twice:?}");
    h.stop().await;
}

/// A CA, a server certificate for 127.0.0.1 and a password file, made now in `dir`.
fn tls_and_passwords(dir: &std::path::Path) -> String {
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    run(&[
        "mosquitto_passwd",
        "-c",
        "-b",
        "passwd",
        "site-a",
        "right-password",
    ]);
    // mosquitto started as root reads its files as the `mosquitto` user.
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca.crt", "server.crt", "server.key", "passwd"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = |f: &str| dir.join(f).display().to_string();
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
        p("ca.crt"),
        p("server.crt"),
        p("server.key"),
        p("passwd")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_login_connect_and_a_missing_login_is_refused_and_reported() {
    let broker = Mosquitto::with_config(tls_and_passwords);
    let ca = broker.dir_path.join("ca.crt").display().to_string();
    // The password comes from the environment, as in production; this variable is this
    // test's alone.
    std::env::set_var("AGGREGATOR_TEST_MQTT_PASSWORD", "right-password");
    let mut m = mqtt(broker.port, "fleet/a");
    m.insecure = false;
    m.ca_file = Some(ca.clone());
    m.username = Some("site-a".into());
    m.password_env = Some("AGGREGATOR_TEST_MQTT_PASSWORD".into());
    let good = Harness::start(site(m.clone())).await;
    good.wait_for(
        Duration::from_secs(15),
        "connected over TLS with a login",
        connected,
    )
    .await;

    let mut anonymous = m;
    anonymous.username = None;
    anonymous.password_env = None;
    anonymous.topic_prefix = "fleet/b".into();
    let bad = Harness::start(site(anonymous)).await;
    let s = bad
        .wait_for(Duration::from_secs(15), "the refusal reported", |s| {
            s["dr"]["mqtt_error"].as_str().is_some()
        })
        .await;
    assert!(!connected(&s));
    let why = s["dr"]["mqtt_error"].as_str().unwrap().to_lowercase();
    assert!(
        why.contains("refused") || why.contains("not authorized"),
        "{why}"
    );
    good.stop().await;
    bad.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_cap_or_the_rate_are_refused_over_http_and_mqtt() {
    let broker = Mosquitto::start();
    let mut c = site(mqtt(broker.port, "fleet/a"));
    if let Some(d) = c.dr.as_mut() {
        d.max_events = 5;
        d.max_events_per_min = 8;
    }
    let h = Harness::start(c).await;
    let (client, mut acks) = aggregator(broker.port, "aggregator").await;
    h.wait_for(Duration::from_secs(10), "connected", connected)
        .await;
    let now = now_of(&h.status().await.unwrap());
    let event = |id: &str| {
        let start = now + chrono::Duration::hours(1);
        json!({"id": id, "start": start, "end": start + chrono::Duration::hours(1),
               "export_limit_w": 50_000})
    };
    for k in 0..5 {
        assert_eq!(post(&h, event(&format!("cap-{k}"))).await, 201);
    }
    assert_eq!(post(&h, event("cap-5")).await, 429, "over the book's cap");
    client
        .publish(
            "fleet/a/dr/events",
            QoS::AtLeastOnce,
            false,
            event("cap-mqtt").to_string(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some((_, v))) = tokio::time::timeout(left, acks.recv()).await else {
            panic!("no rejection over MQTT");
        };
        if v["id"] == "cap-mqtt" {
            assert_eq!(v["status"], "rejected", "{v}");
            assert!(v["reason"].as_str().unwrap().contains("max_events"), "{v}");
            break;
        }
    }
    // Room again in the book, but not in the minute: 5 accepted so far, 3 more fit.
    for k in 0..5 {
        let r = h
            .client
            .delete(format!("{}/api/v1/dr/events/cap-{k}", h.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    for k in 0..3 {
        assert_eq!(post(&h, event(&format!("rate-{k}"))).await, 201);
    }
    assert_eq!(post(&h, event("rate-3")).await, 429, "over the rate");
    h.stop().await;
}

fn with_store(path: &std::path::Path) -> SiteConfig {
    let mut c = site(mqtt(1, "fleet/a"));
    // No broker here: the link stays down; only the store matters.
    if let Some(d) = c.dr.as_mut() {
        d.mqtt = None;
    }
    c.store = Some(site_ems::config::StoreConfig {
        path: path.display().to_string(),
    });
    c
}

fn in_force(s: &Value, id: &str) -> bool {
    s["dr"]["constraints"]["active"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == id))
}

/// A store that cannot be opened (its directory is a file: even root cannot make it one),
/// refuses every event: 503, and nothing in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_refuses_events_and_nothing_is_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("store");
    std::fs::write(&not_a_dir, "a file, not a directory").unwrap();
    let h = Harness::start(with_store(&not_a_dir.join("ems.db"))).await;
    let s = h
        .wait_for(Duration::from_secs(10), "cycling", |s| {
            s["cycle"].as_u64() > Some(2)
        })
        .await;
    let now = now_of(&s);
    let event = json!({"id": "ro-1", "start": now, "end": now + chrono::Duration::hours(1),
                       "export_limit_w": 0});
    assert_eq!(post(&h, event).await, 503);
    let s = h.status().await.unwrap();
    assert!(
        !in_force(&s, "ro-1") && s["dr"]["constraints"]["export_limit_w"].is_null(),
        "{}",
        s["dr"]
    );
    let list = h.dr_events(TOKEN).await;
    assert_eq!(list, json!([]));
    h.stop().await;
}

/// A cancel the store cannot take (another process holds the file) changes nothing: the
/// event stays in force, and after a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_store_cannot_take_changes_nothing_before_or_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ems.db");
    let h = Harness::start(with_store(&path)).await;
    let s = h
        .wait_for(Duration::from_secs(10), "cycling", |s| {
            s["cycle"].as_u64() > Some(2)
        })
        .await;
    let now = now_of(&s);
    let event = json!({"id": "keep-1", "start": now, "end": now + chrono::Duration::hours(1),
                       "export_limit_w": 0});
    assert_eq!(post(&h, event).await, 201);
    h.wait_for(Duration::from_secs(5), "in force", |s| {
        in_force(s, "keep-1")
    })
    .await;

    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder_path = path.clone();
    let holder = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&holder_path).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let _ = locked_tx.send(());
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.await.unwrap();
    let r = h
        .client
        .delete(format!("{}/api/v1/dr/events/keep-1", h.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503, "{}", r.text().await.unwrap());
    assert!(
        in_force(&h.status().await.unwrap(), "keep-1"),
        "still in force"
    );
    h.stop().await;
    let _ = release_tx.send(());
    holder.await.unwrap();

    let h = Harness::start(with_store(&path)).await;
    h.wait_for(Duration::from_secs(10), "in force after the restart", |s| {
        in_force(s, "keep-1")
    })
    .await;
    h.stop().await;
}

/// The fleet harness: 100 complete sites, one group event. Figures are printed, not asserted
/// (the 1,000-site run is `cargo bench --bench fleet`); that every site enforces the event
/// and acknowledges it is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_100_sites_obeys_one_group_event() {
    let broker = Mosquitto::start();
    let f = site_ems::sim::fleet::measure(100, broker.port, Some(broker.pid()))
        .await
        .expect("the fleet starts");
    println!("{}", serde_json::to_string_pretty(&f).unwrap());
    assert_eq!(f.bind_missing, 0, "sites that never enforced the event");
    assert_eq!(f.ack_missing, 0, "sites whose ack never arrived");
}

/// An ack the broker never confirmed is on disk: after a restart it still arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_ack_survives_a_restart() {
    let broker = Mosquitto::start();
    let cut = LinkCut::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ems.db");
    let mut c = site(mqtt(cut.port, "fleet/a"));
    c.store = Some(site_ems::config::StoreConfig {
        path: path.display().to_string(),
    });
    let (_client, mut acks) = aggregator(broker.port, "aggregator").await;
    let h = Harness::start(c.clone()).await;
    h.wait_for(Duration::from_secs(10), "connected", connected)
        .await;
    cut.cut();
    h.wait_for(Duration::from_secs(10), "link down", |s| !connected(s))
        .await;
    let now = now_of(&h.status().await.unwrap());
    let start = now + chrono::Duration::hours(1);
    let event = json!({"id": "kept-1", "start": start, "end": start + chrono::Duration::hours(1),
                       "export_limit_w": 50_000});
    assert_eq!(post(&h, event).await, 201);
    // The guard loop hands the ack to the link on its next cycle; then the EMS stops.
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.stop().await;

    cut.restore();
    let h = Harness::start(c).await;
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wait = if seen > 0 {
            left.min(Duration::from_secs(2))
        } else {
            left
        };
        match tokio::time::timeout(wait, acks.recv()).await {
            Ok(Some((_, v))) if v["id"] == "kept-1" && v["status"] == "accepted" => seen += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(seen, 1, "the accepted ack arrives once after the restart");
    h.stop().await;
}
