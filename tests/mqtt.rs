//! Demand response over MQTT through a real mosquitto broker on loopback: events take effect
//! at their start and end at their end, acknowledgements arrive on the ack topic, and a lost
//! broker puts the fallback limits in force until it is back.

#![cfg(feature = "sim")]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::broker::Mosquitto;
use common::{fast_site, Harness};
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};
use site_ems::config::{DrConfig, MqttConfig, SiteConfig};
use tokio::sync::mpsc;

fn site(port: u16) -> SiteConfig {
    let mut c = fast_site("sites/demo.yaml");
    c.export_limit = site_ems::config::GridLimitConfig::TotalPower { limit_w: 100_000.0 };
    c.simulation.initial_soc_pct = 100.0;
    c.simulation.load_noise_pct = 0.0;
    c.dr = Some(DrConfig {
        mqtt: Some(MqttConfig {
            heartbeat_s: 2.0,
            telemetry_s: 0.5,
            fallback: site_ems::dr::LevelLimits {
                export_limit_w: Some(0.0),
                import_limit_w: None,
            },
            ..MqttConfig::plain("127.0.0.1", port, "ems/test")
        }),
        ..Default::default()
    });
    c
}

/// An aggregator: publishes events, hears acks and telemetry.
async fn aggregator(port: u16) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    common::broker::aggregator(
        port,
        "aggregator",
        &["ems/test/dr/ack", "ems/test/telemetry"],
    )
    .await
}

/// Wait for an ack of `id` with `status` on the ack topic.
async fn ack(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, id: &str, status: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((topic, v)))
                if topic.ends_with("dr/ack") && v["id"] == id && v["status"] == status =>
            {
                return
            }
            Ok(Some(_)) => continue,
            _ => panic!("no `{status}` ack for {id}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_events_acks_telemetry_and_fallback_through_a_real_broker() {
    let mut broker = Mosquitto::start();
    let h = Harness::start(site(broker.port)).await;
    let (client, mut rx) = aggregator(broker.port).await;
    let s = h
        .wait_for(
            Duration::from_secs(10),
            "EMS connected to the broker",
            |s| s["dr"]["mqtt_connected"] == true,
        )
        .await;
    let now: DateTime<Utc> = s["time"].as_str().unwrap().parse().unwrap();

    // An event over MQTT: accepted now, active at its start, ended at its end.
    let start = now + chrono::Duration::seconds(3);
    let event = json!({"id": "mq-1", "start": start, "end": start + chrono::Duration::seconds(4), "export_limit_w": 5000});
    client
        .publish(
            "ems/test/dr/events",
            QoS::AtLeastOnce,
            false,
            event.to_string(),
        )
        .await
        .unwrap();
    ack(&mut rx, "mq-1", "accepted").await;
    let active = |s: &Value| {
        s["dr"]["constraints"]["active"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "mq-1"))
    };
    assert!(!active(&h.status().await.unwrap()), "not before its start");
    ack(&mut rx, "mq-1", "active").await;
    let s = h.wait_for(Duration::from_secs(5), "in force", active).await;
    assert!(
        s["time"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap()
            >= start
    );
    h.wait_for(Duration::from_secs(5), "export held to 5 kW", |s| {
        s["grid"]["power_w"].as_f64().is_some_and(|g| -g <= 5000.0)
    })
    .await;
    ack(&mut rx, "mq-1", "ended").await;
    h.wait_for(Duration::from_secs(5), "over", |s| !active(s))
        .await;

    // A malformed event is rejected with a reason, and changes nothing.
    client
        .publish(
            "ems/test/dr/events",
            QoS::AtLeastOnce,
            false,
            r#"{"id": "bad-1", "drm": 12}"#,
        )
        .await
        .unwrap();
    ack(&mut rx, "bad-1", "rejected").await;

    // Telemetry arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((topic, v))) if topic.ends_with("telemetry") => {
                assert!(
                    v["grid_power_w"].is_number() && v["fleet_soc_pct"].is_number(),
                    "{v}"
                );
                break;
            }
            Ok(Some(_)) => continue,
            _ => panic!("no telemetry"),
        }
    }

    // The broker goes away: past the 2 s heartbeat the fallback (export 0) applies.
    broker.stop();
    let s = h
        .wait_for(Duration::from_secs(10), "fallback in force", |s| {
            s["dr"]["fallback"] == true && s["dr"]["constraints"]["export_limit_w"] == 0.0
        })
        .await;
    assert_eq!(s["dr"]["mqtt_connected"], false);
    h.wait_for(
        Duration::from_secs(8),
        "export stopped by the fallback",
        |s| s["grid"]["power_w"].as_f64().is_some_and(|g| g >= 0.0),
    )
    .await;
    let metrics = h
        .client
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ems_dr_fallback_active{site=\"demo\"} 1"),
        "fallback metric"
    );

    // Back: the fallback lifts and events flow again.
    broker.restart();
    h.wait_for(Duration::from_secs(15), "link back, fallback lifted", |s| {
        s["dr"]["mqtt_connected"] == true && s["dr"]["fallback"] == false
    })
    .await;
    let s = h.status().await.unwrap();
    let now: DateTime<Utc> = s["time"].as_str().unwrap().parse().unwrap();
    let event =
        json!({"id": "mq-2", "start": now, "end": now + chrono::Duration::hours(1), "drm": 6});
    // The aggregator's own client reconnects too; retry until the ack shows it got through.
    let mut accepted = false;
    for _ in 0..20 {
        let _ = client
            .publish(
                "ems/test/dr/events",
                QoS::AtLeastOnce,
                false,
                event.to_string(),
            )
            .await;
        if tokio::time::timeout(Duration::from_millis(500), ack(&mut rx, "mq-2", "accepted"))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
    }
    assert!(accepted, "events resume after the broker is back");
    let metrics = h
        .client
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ems_dr_link_up{site=\"demo\"} 1"),
        "link metric"
    );
    h.stop().await;
}
