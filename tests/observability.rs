//! Observability with real parts: promtool lints `/metrics`, a real Prometheus scrapes the
//! EMS running against the simulated demo site, and every query of every dashboard panel
//! returns at least one series. Every metric the EMS exports is used by some panel.

#![cfg(feature = "sim")]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{all_healthy, fast_site, inverter, Harness};
use serde_json::Value;
use site_ems::sim::Behaviour;

struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: ems\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (.ci/run installs it: apt-get install prometheus)");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn query(&self, client: &reqwest::Client, expr: &str) -> Result<Vec<Value>, String> {
        let r = client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{body}"));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir("dashboards")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (
                p.display().to_string(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 3,
        "site overview, fleet and control dashboards"
    );
    out
}

/// Every (dashboard, panel title, expr).
fn targets(ds: &[(String, Value)]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (file, d) in ds {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    file.clone(),
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

#[test]
fn dashboards_are_well_formed() {
    let ds = dashboards();
    let mut uids = BTreeSet::new();
    for (file, d) in &ds {
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_string()),
            "{file}: duplicate uid"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["type"] == "datasource"
                && v["name"] == "datasource"
                && v["query"] == "prometheus"),
            "{file}: a Prometheus datasource variable"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{file}: panel id reused by {title}"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: {title} uses the variable"
            );
            let unit = p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "{file}: {title} has no unit");
            let ts = p["targets"].as_array().unwrap();
            assert!(!ts.is_empty(), "{file}: {title} has no query");
            for t in ts {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{file}: {title}");
            }
        }
        // No datasource is named by a fixed UID anywhere.
        let text = serde_json::to_string(d).unwrap();
        for (i, _) in text.match_indices("\"uid\":\"") {
            let rest = &text[i + 7..];
            let value = &rest[..rest.find('"').unwrap()];
            assert!(
                value == "${datasource}" || value == d["uid"],
                "{file}: fixed uid {value}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_and_prometheus_accept_the_metrics_and_every_panel_has_data() {
    // The demo with its aggregator link to a real broker, so the MQTT panels have data too.
    let broker = common::broker::Mosquitto::start();
    let mut c = fast_site("sites/demo.yaml");
    if let Some(d) = c.dr.as_mut() {
        d.mqtt = Some(site_ems::config::MqttConfig {
            telemetry_s: 5.0,
            ..site_ems::config::MqttConfig::plain("127.0.0.1", broker.port, "fleet/demo")
        });
    }
    let h = Harness::start(c).await;
    h.wait_for(Duration::from_secs(10), "all devices healthy", all_healthy)
        .await;
    // A fault and a Modbus exception, so their series exist too.
    h.sim
        .with_model(|m| m.inverter_mut("inv05").unwrap().fault_words[1] = 1 << 22);
    h.sim.set_behaviour("inv04", Behaviour::Exception(0x02));
    h.wait_for(Duration::from_secs(5), "fault and exception seen", |s| {
        inverter(s, "inv05")["health"] == "faulted"
            && inverter(s, "inv04")["error"]
                .as_str()
                .is_some_and(|e| e.contains("exception"))
    })
    .await;
    h.sim.set_behaviour("inv04", Behaviour::Normal);

    let metrics = h
        .client
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (with prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(h.base.trim_start_matches("http://"));
    let client = reqwest::Client::new();
    // Enough scrapes for rate() over a minute's window.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = prom
            .query(
                &client,
                r#"count_over_time(up{job="ems"}[1m]) >= 4 and up{job="ems"} == 1"#,
            )
            .await
            .is_ok_and(|r| !r.is_empty());
        if ready {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never scraped the EMS"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let ds = dashboards();
    let mut failures = Vec::new();
    let all = targets(&ds);
    // A constant padding a query (`or vector(0)`) would show a dead EMS as healthy.
    for (file, title, expr) in &all {
        assert!(
            !expr.contains("vector("),
            "{file} · {title} pads its query with a constant: {expr}"
        );
    }
    for (file, title, expr) in &all {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$site", ".+")
            .replace("$device", ".+");
        match prom.query(&client, &q).await {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("{file} · {title}: no series for {q}")),
            Err(e) => failures.push(format!("{file} · {title}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "panels without data:\n{}",
        failures.join("\n")
    );
    // The fallbacks (`or vector(0)`) must not hide the real series.
    for expr in ["ems_inverter_fault", "ems_modbus_exceptions_total"] {
        assert!(
            !prom.query(&client, expr).await.unwrap().is_empty(),
            "{expr} has series"
        );
    }

    // Every metric family the EMS exports is shown by some panel.
    let exprs: Vec<&str> = all.iter().map(|t| t.2.as_str()).collect();
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() > 20, "{families:?}");
    for f in families {
        assert!(
            exprs.iter().any(|e| e.contains(f)),
            "metric {f} is on no dashboard"
        );
    }
    h.stop().await;
}
