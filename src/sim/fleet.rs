//! Many complete sites in one process, for fleet tests and the fleet benchmark: each has its
//! own simulated devices (Modbus TCP on loopback), the real guard loop, its own DR book and
//! its own MQTT connection — everything `ems run --simulate` has except the HTTP API.
//!
//! The site file is the shipped single-phase home at sunny midday with a full battery, so
//! every site exports and an export limit of 0 binds at once.

use std::path::Path;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{DrConfig, MqttConfig, SiteConfig};
use crate::runtime::{Ems, EmsOptions};
use crate::sim::SimSite;
use crate::web::api::Published;

/// One site of the fleet.
pub struct FleetSite {
    pub id: String,
    pub sim: SimSite,
    /// What the guard loop publishes each cycle.
    pub status: watch::Receiver<Option<Published>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FleetSite {
    /// Start the simulator and the EMS for `config` (devices rewired to the simulator).
    pub async fn start(id: String, config: &SiteConfig) -> std::io::Result<FleetSite> {
        let sim = SimSite::start(config).await?;
        let (ems, app) = Ems::with_options(sim.rewire(config), sim.clock(), EmsOptions::default());
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(ems.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Ok(FleetSite {
            id,
            sim,
            status: app.status,
            stop,
            task,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Whether the guard loop has the event `id` in force and the export limit at 0 W.
    pub fn enforces(&self, event_id: &str) -> bool {
        self.status.borrow().as_ref().is_some_and(|p| {
            p.status.dr.as_ref().is_some_and(|d| {
                d.constraints.export_limit_w == Some(0.0)
                    && d.constraints.active.iter().any(|a| a == event_id)
            })
        })
    }

    /// Whether the MQTT link is up.
    pub fn connected(&self) -> bool {
        self.status.borrow().as_ref().is_some_and(|p| {
            p.status
                .dr
                .as_ref()
                .is_some_and(|d| d.mqtt_connected == Some(true))
        })
    }
}

/// The site file for fleet member `k` on the broker at `port`: the shipped home, in group
/// `all`, topics under `fleet/site-<k>`.
pub fn member_config(k: usize, broker_port: u16) -> std::io::Result<SiteConfig> {
    let mut c = SiteConfig::load(Path::new("sites/home-1ph.yaml"))
        .map_err(|e| std::io::Error::other(format!("sites/home-1ph.yaml: {e}")))?;
    c.site.name = "home".into();
    c.simulation.start = Some("2026-06-21T12:00".into());
    c.simulation.initial_soc_pct = 100.0;
    c.simulation.load_noise_pct = 0.0;
    c.simulation.seed = k as u64;
    c.planner = None;
    c.dr = Some(DrConfig {
        mqtt: Some(MqttConfig {
            groups: vec!["all".into()],
            groups_prefix: "fleet/groups".into(),
            heartbeat_s: 600.0,
            telemetry_s: 60.0,
            ..MqttConfig::plain("127.0.0.1", broker_port, &format!("fleet/site-{k}"))
        }),
        ..Default::default()
    });
    Ok(c)
}

/// Resident memory of this process, bytes (Linux; `None` elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Percentiles of durations in ms: (p50, p99, max).
pub fn percentiles_ms(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// When each site first met `done` after `from`, polling every 5 ms until `deadline`: ms per
/// site, `None` for those that never did.
pub async fn times_until(
    sites: &[FleetSite],
    from: Instant,
    deadline: std::time::Duration,
    done: impl Fn(&FleetSite) -> bool,
) -> Vec<Option<f64>> {
    let mut at: Vec<Option<f64>> = vec![None; sites.len()];
    while from.elapsed() < deadline && at.iter().any(Option::is_none) {
        for (k, s) in sites.iter().enumerate() {
            if at[k].is_none() && done(s) {
                at[k] = Some(from.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    at
}

/// CPU time this process has used, seconds (Linux; `None` elsewhere).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// What one group event did to the fleet.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub sites: usize,
    pub start_s: f64,
    /// From the publish until each site's guard loop enforced the event (ms).
    pub bind_ms: (f64, f64, f64),
    pub bind_missing: usize,
    /// From the publish until each site's `accepted` ack reached the aggregator (ms).
    pub ack_ms: (f64, f64, f64),
    pub ack_missing: usize,
    pub rss_per_site_bytes: Option<f64>,
    /// CPU cores busy, on average, over 10 s of steady running before the event.
    pub harness_cores: Option<f64>,
    pub broker_cores: Option<f64>,
}

/// Start `n` sites on the broker at `broker_port` (its process `broker_pid`, for its CPU),
/// publish one group event (`export_limit_w: 0`) once, and time what follows.
pub async fn measure(
    n: usize,
    broker_port: u16,
    broker_pid: Option<u32>,
) -> std::io::Result<Figures> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rss0 = resident_bytes();
    let started = Instant::now();
    let mut sites = Vec::with_capacity(n);
    for k in 0..n {
        sites.push(FleetSite::start(format!("site-{k}"), &member_config(k, broker_port)?).await?);
    }
    let connected = times_until(
        &sites,
        Instant::now(),
        std::time::Duration::from_secs(60),
        FleetSite::connected,
    )
    .await;
    let start_s = started.elapsed().as_secs_f64();
    if connected.iter().any(Option::is_none) {
        tracing::warn!(
            "{} sites never connected",
            connected.iter().filter(|c| c.is_none()).count()
        );
    }
    let rss_per_site_bytes = rss0
        .zip(resident_bytes())
        .map(|(a, b)| b.saturating_sub(a) as f64 / n.max(1) as f64);

    // Steady running: what the fleet and the broker cost.
    let (h0, b0, t0) = (cpu_seconds(None), cpu_seconds(broker_pid), Instant::now());
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let wall = t0.elapsed().as_secs_f64();
    let harness_cores = cpu_seconds(None).zip(h0).map(|(b, a)| (b - a) / wall);
    let broker_cores = cpu_seconds(broker_pid).zip(b0).map(|(b, a)| (b - a) / wall);

    // The aggregator hears every ack.
    let mut o = MqttOptions::new("fleet-aggregator", "127.0.0.1", broker_port);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    o.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let sub = client.clone();
    let listener = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.subscribe("fleet/+/dr/ack", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    if v["id"] == "fleet-0" && v["status"] == "accepted" {
                        let site = v["site"].as_str().unwrap_or_default().to_string();
                        let _ = acked_tx.send((site, Instant::now()));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    });
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ready_rx.recv()).await;
    // The sites' clocks all start at the same simulated noon: an event from midnight to a
    // day later is in force at once everywhere.
    let event = serde_json::json!({"id": "fleet-0", "start": "2026-06-21T00:00:00Z",
                                   "end": "2026-06-22T00:00:00Z", "export_limit_w": 0});
    let published = Instant::now();
    let _ = client
        .publish(
            "fleet/groups/all/dr/events",
            QoS::AtLeastOnce,
            false,
            event.to_string(),
        )
        .await;
    let bound = times_until(&sites, published, std::time::Duration::from_secs(10), |s| {
        s.enforces("fleet-0")
    })
    .await;
    let mut acks = std::collections::HashMap::new();
    let until = published + std::time::Duration::from_secs(10);
    while acks.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, acked_rx.recv()).await {
            Ok(Some((site, at))) => {
                acks.entry(site)
                    .or_insert(at.duration_since(published).as_secs_f64() * 1000.0);
            }
            _ => break,
        }
    }
    listener.abort();
    for s in sites {
        s.stop().await;
    }
    let bind: Vec<f64> = bound.iter().flatten().copied().collect();
    Ok(Figures {
        sites: n,
        start_s,
        bind_missing: n - bind.len(),
        bind_ms: percentiles_ms(bind),
        ack_missing: n - acks.len(),
        ack_ms: percentiles_ms(acks.into_values().collect()),
        rss_per_site_bytes,
        harness_cores,
        broker_cores,
    })
}
