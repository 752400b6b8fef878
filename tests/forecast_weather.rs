//! Weather forecasts become the plan's PV forecast: a local HTTP server serves an Open-Meteo
//! and a forecast.solar response in the services' formats (tests/data), `ems plan` fetches
//! them, and a failing URL falls back to the clear sky and says so.

use std::process::Command;

use axum::routing::get;
use serde_json::Value;

/// Serve the recorded responses (and a failing route) on a free loopback port.
async fn server() -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route(
            "/open-meteo",
            get(|| async { include_str!("data/open-meteo-london-2026-06-21.json") }),
        )
        .route(
            "/forecast-solar",
            get(|| async { include_str!("data/forecast-solar-london-2026-06-21.json") }),
        )
        .route(
            "/down",
            get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "maintenance") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, task)
}

/// `ems plan --json` for the demo site on 21 June, with `weather` under its PV forecast.
async fn plan_with(weather: Option<String>) -> Value {
    let demo = std::fs::read_to_string("sites/demo.yaml").unwrap();
    let arrays = "      - { kwp: 80, tilt_deg: 35, azimuth_deg: 180, losses_pct: 14 }\n";
    assert!(demo.contains(arrays), "the demo site's array");
    let text = match weather {
        Some(w) => demo.replace(arrays, &format!("{arrays}    weather: {w}\n")),
        None => demo,
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("site.yaml");
    std::fs::write(&file, text).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ems"))
            .args([
                "plan",
                file.to_str().unwrap(),
                "--json",
                "--start",
                "2026-06-20T23:00:00Z",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pv_at(plan: &Value, start: &str) -> f64 {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["start"] == start)
        .unwrap_or_else(|| panic!("a step at {start}"))["pv_w"]
        .as_f64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weather_forecasts_become_the_plans_pv_and_a_failing_one_falls_back() {
    let (base, server) = server().await;
    let clear = plan_with(None).await;

    // Open-Meteo: the cloud between 12:00 and 13:00 GMT is in the forecast.
    let om = plan_with(Some(format!(
        "{{ service: open_meteo, url: \"{base}/open-meteo\" }}"
    )))
    .await;
    let source = om["sources"]["pv"].as_str().unwrap();
    assert!(
        source.starts_with("Open-Meteo forecast fetched"),
        "{source}"
    );
    let (cloud, sunny) = (
        pv_at(&om, "2026-06-21T12:15:00Z"),
        pv_at(&clear, "2026-06-21T12:15:00Z"),
    );
    println!("12:15 GMT under the cloud: {cloud:.0} W, clear sky {sunny:.0} W");
    assert!(cloud < 0.5 * sunny, "{cloud} vs {sunny}");
    assert!(pv_at(&om, "2026-06-21T10:00:00Z") > 0.8 * pv_at(&clear, "2026-06-21T10:00:00Z"));
    // Each step says where its PV came from: the forecast covers 00:30–23:30 GMT.
    let from = |plan: &Value, start: &str| {
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["start"] == start)
            .unwrap()["pv_source"]
            .clone()
    };
    assert_eq!(from(&om, "2026-06-21T12:15:00Z"), "weather");
    assert_eq!(from(&om, "2026-06-20T23:00:00Z"), "clear_sky");

    // forecast.solar: 12.5 kW flat from 10:00 to 14:00 BST (09:00–13:00 UTC).
    let fs = plan_with(Some(format!(
        "{{ service: forecast_solar, url: \"{base}/forecast-solar\" }}"
    )))
    .await;
    assert!(fs["sources"]["pv"]
        .as_str()
        .unwrap()
        .starts_with("forecast.solar forecast fetched"));
    for t in [
        "2026-06-21T09:00:00Z",
        "2026-06-21T10:30:00Z",
        "2026-06-21T12:45:00Z",
    ] {
        assert!(
            (pv_at(&fs, t) - 12_500.0).abs() < 1.0,
            "{t}: {}",
            pv_at(&fs, t)
        );
    }

    // A failing service: the clear sky, and the plan says why.
    let down = plan_with(Some(format!(
        "{{ service: open_meteo, url: \"{base}/down\" }}"
    )))
    .await;
    let source = down["sources"]["pv"].as_str().unwrap();
    assert!(
        source.contains("Open-Meteo forecast fetch failed") && source.contains("503"),
        "{source}"
    );
    assert_eq!(
        down["steps"], clear["steps"],
        "the clear-sky forecast, unchanged"
    );
    server.abort();
}
