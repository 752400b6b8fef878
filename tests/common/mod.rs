//! Shared test harness: a simulated site served over real Modbus TCP on loopback, and the
//! EMS with its HTTP API on a free port, both stopped when the harness is dropped.
#![allow(dead_code)]

pub mod broker;
pub mod lossy;
pub mod reference;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use site_ems::config::SiteConfig;
use site_ems::sim::SimSite;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Harness {
    pub sim: SimSite,
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    ems: Option<JoinHandle<std::io::Result<()>>>,
}

/// Load a shipped site and make it quick to test: a short cycle and staleness limit.
pub fn fast_site(path: &str) -> SiteConfig {
    let mut c = SiteConfig::load(Path::new(path)).expect("shipped site is valid");
    c.control.cycle_ms = 200;
    c.control.stale_after_s = 1.0;
    c
}

/// The demo site for closed loops: 1 s cycles, 3 s staleness, no load noise.
pub fn demo_1s() -> SiteConfig {
    let mut c = fast_site("sites/demo.yaml");
    c.control.cycle_ms = 1000;
    c.control.stale_after_s = 3.0;
    c.simulation.load_noise_pct = 0.0;
    c
}

impl Harness {
    pub async fn start(config: SiteConfig) -> Harness {
        let sim = SimSite::start(&config).await.expect("simulator starts");
        let ems_config = sim.rewire(&config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let ems = tokio::spawn(site_ems::runtime::serve(
            ems_config,
            listener,
            sim.clock(),
            async move {
                let _ = stopped.await;
            },
        ));
        Harness {
            sim,
            base,
            client: reqwest::Client::new(),
            stop: Some(stop),
            ems: Some(ems),
        }
    }

    pub async fn status(&self) -> Option<Value> {
        let r = self
            .client
            .get(format!("{}/api/v1/status", self.base))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// POST a demand-response event (`body` as sent, valid JSON or not) with an optional
    /// bearer token: the status code (0 when the request never got an answer) and the reply.
    pub async fn post_event(&self, token: Option<&str>, body: String) -> (u16, Value) {
        let mut r = self
            .client
            .post(format!("{}/api/v1/dr/events", self.base))
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        match r.send().await {
            Ok(r) => {
                let code = r.status().as_u16();
                (code, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// The demand-response events in the book, as `GET /api/v1/dr/events` lists them.
    pub async fn dr_events(&self, token: &str) -> Value {
        self.client
            .get(format!("{}/api/v1/dr/events", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("the EMS answers")
            .json()
            .await
            .expect("a JSON list")
    }

    /// Poll the status until `pred` holds; panic with the last status after `within`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}; last status: {last:#?}");
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(ems) = self.ems.take() {
            ems.await.expect("ems task").expect("ems shut down cleanly");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn inverter<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["inverters"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["id"] == id))
        .unwrap_or_else(|| panic!("inverter {id} in status"))
}

pub fn all_healthy(status: &Value) -> bool {
    status["grid"]["health"] == "ok"
        && status["inverters"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["health"] == "ok"))
}

/// `sites/rs485.yaml` on pty pairs: the site file's links point at the master ends; the map
/// gives the simulator the slave ends. Keep the pairs alive as long as the site runs.
pub fn rs485_on_ptys(
    baud: u32,
) -> (
    SiteConfig,
    std::collections::HashMap<String, std::path::PathBuf>,
    Vec<site_ems::sim::pty::PtyPair>,
) {
    let mut c = SiteConfig::load(Path::new("sites/rs485.yaml")).expect("shipped site is valid");
    let mut rtu = std::collections::HashMap::new();
    let mut pairs = Vec::new();
    for link in c.links.iter_mut() {
        let pair = site_ems::sim::pty::PtyPair::new()
            .expect("socat is installed (.ci/run installs it: apt-get install socat)");
        link.device = Some(pair.master.display().to_string());
        link.baud = Some(baud);
        rtu.insert(link.name.clone(), pair.slave.clone());
        pairs.push(pair);
    }
    (c, rtu, pairs)
}
