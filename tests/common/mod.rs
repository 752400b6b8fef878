//! Shared test harness: a simulated site served over real Modbus TCP on loopback, and the
//! EMS with its HTTP API on a free port, both stopped when the harness is dropped.
#![allow(dead_code)]

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

impl Harness {
    pub async fn start(config: SiteConfig) -> Harness {
        let sim = SimSite::start(&config).await.expect("simulator starts");
        let ems_config = sim.rewire(&config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let ems = tokio::spawn(site_ems::run::serve(
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

/// The EMS and a simulated site in lock-step over real Modbus TCP: simulated time advances
/// in physics ticks, and the EMS runs one full cycle (read, decide, write) per control
/// period, so a minute of site time takes well under a second.
pub struct ClosedLoop {
    pub sim: SimSite,
    pub ems: site_ems::run::Ems,
    pub t_s: f64,
    cycle_s: f64,
    next_cycle_s: f64,
}

pub const TICK_S: f64 = 0.1;

impl ClosedLoop {
    pub async fn start(config: SiteConfig) -> ClosedLoop {
        let sim = SimSite::start(&config).await.expect("simulator starts");
        sim.set_paused(true);
        let (ems, _api) = site_ems::run::Ems::new(sim.rewire(&config), sim.clock());
        ClosedLoop {
            sim,
            ems,
            t_s: 0.0,
            cycle_s: config.control.cycle_ms as f64 / 1000.0,
            next_cycle_s: 0.0,
        }
    }

    /// One physics tick, and an EMS cycle when one is due.
    pub async fn tick(&mut self) {
        self.sim.advance(TICK_S);
        self.t_s += TICK_S;
        if self.t_s + 1e-9 >= self.next_cycle_s {
            self.ems.cycle().await;
            self.next_cycle_s += self.cycle_s;
        }
    }

    /// Run for `seconds` of site time, calling `watch` after every tick.
    pub async fn run(
        &mut self,
        seconds: f64,
        mut watch: impl FnMut(f64, &site_ems::sim::physics::SiteModel),
    ) {
        let end = self.t_s + seconds;
        while self.t_s < end - 1e-9 {
            self.tick().await;
            let t = self.t_s;
            self.sim.with_model(|m| watch(t, m));
        }
    }

    /// Export per phase right now (+ export), from the simulator's ground truth.
    pub fn phase_export_w(&self) -> [f64; 3] {
        self.sim.with_model(|m| m.truth.grid_w.map(|g| -g))
    }

    pub fn export_w(&self) -> f64 {
        self.phase_export_w().iter().sum()
    }

    /// No write was refused by the simulated firmware, and every value on the wire lies in
    /// its register's documented range.
    pub fn assert_clean_writes(&self) {
        let writes = self.sim.writes();
        assert!(!writes.is_empty(), "the EMS wrote nothing");
        for w in writes {
            let s = site_ems::drivers::saj::setting(w.addr)
                .unwrap_or_else(|| panic!("write to undocumented register {:#06x}", w.addr));
            assert!(
                w.accepted && (s.min..=s.max).contains(&w.value),
                "bad write on the wire: {w:?}"
            );
        }
    }
}

/// Excursions of a signal above a limit: their durations in seconds.
#[derive(Default, Debug)]
pub struct Excursions {
    started: Option<f64>,
    pub done: Vec<(f64, f64)>,
    pub worst_w: f64,
}

impl Excursions {
    pub fn observe(&mut self, t: f64, value: f64, limit: f64) {
        if value > limit + 1e-6 {
            self.worst_w = self.worst_w.max(value - limit);
            self.started.get_or_insert(t);
        } else if let Some(t0) = self.started.take() {
            self.done.push((t0, t - t0));
        }
    }

    pub fn longest_s(&self) -> f64 {
        self.done.iter().map(|e| e.1).fold(0.0, f64::max)
    }

    /// Close an excursion still open at `t`.
    pub fn finish(&mut self, t: f64) {
        if let Some(t0) = self.started.take() {
            self.done.push((t0, t - t0));
        }
    }
}
