//! The aggregator's MQTT link (rumqttc): demand-response events in, acknowledgements and
//! telemetry out. The link's state drives the fallback: down longer than the heartbeat, the
//! site's fallback limits apply until it is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};

use crate::config::MqttConfig;
use crate::dr::book::{Ack, SharedBook};
use crate::dr::wire::EventRequest;

/// What the site tells its aggregator every `telemetry_s`: the loop publishes it each cycle.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Telemetry {
    pub time: String,
    pub grid_power_w: Option<f64>,
    pub fleet_soc_pct: Option<f64>,
    pub export_limit_w: Option<f64>,
    pub dr: crate::dr::DrConstraints,
}

/// Whether the broker is reachable, and since when it is not.
#[derive(Debug, Default)]
pub struct LinkState {
    connected: bool,
    down_since: Option<Instant>,
}

impl LinkState {
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Down for longer than `heartbeat` (or never up since start).
    pub fn lost_for(&self, heartbeat: Duration) -> bool {
        !self.connected && self.down_since.is_some_and(|t| t.elapsed() >= heartbeat)
    }
}

pub struct Topics {
    pub events: String,
    pub ack: String,
    pub telemetry: String,
    pub status: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        let p = prefix.trim_end_matches('/');
        Topics {
            events: format!("{p}/dr/events"),
            ack: format!("{p}/dr/ack"),
            telemetry: format!("{p}/telemetry"),
            status: format!("{p}/status"),
        }
    }
}

fn options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_last_will(LastWill::new(
        &topics.status,
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &cfg.username {
        let password = cfg
            .password_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .unwrap_or_default();
        o.set_credentials(user, password);
    }
    if let Some(ca) = &cfg.ca_file {
        let ca = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }));
    }
    Ok(o)
}

/// Run the link until the process ends: reconnects by itself.
pub fn spawn(
    cfg: MqttConfig,
    book: SharedBook,
    mut acks: mpsc::UnboundedReceiver<Ack>,
    mut telemetry_rx: watch::Receiver<Option<Telemetry>>,
    state: Arc<Mutex<LinkState>>,
) {
    let topics = Topics::new(&cfg.topic_prefix);
    let opts = match options(&cfg, &topics) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("MQTT not started: {e}");
            state.lock().unwrap_or_else(|e| e.into_inner()).down_since = Some(Instant::now());
            return;
        }
    };
    state.lock().unwrap_or_else(|e| e.into_inner()).down_since = Some(Instant::now());
    // Incoming events wait for the store; they are handled in order by a task of their own
    // so the event loop keeps polling meanwhile.
    let (inbox, mut inbox_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (reject_tx, mut reject_rx) = mpsc::unbounded_channel::<Ack>();
    tokio::spawn(async move {
        while let Some(payload) = inbox_rx.recv().await {
            if let Some(ack) = receive(&book, &payload).await {
                if reject_tx.send(ack).is_err() {
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let mut telemetry =
            tokio::time::interval(Duration::from_secs_f64(cfg.telemetry_s.max(0.1)));
        loop {
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        {
                            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                            s.connected = true;
                            s.down_since = None;
                        }
                        tracing::info!("MQTT connected to {}:{}", cfg.host, cfg.port);
                        let _ = client.subscribe(&topics.events, QoS::AtLeastOnce).await;
                        let _ = client.publish(&topics.status, QoS::AtLeastOnce, true, "online").await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.events => {
                        let _ = inbox.send(p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        {
                            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                            if s.connected || s.down_since.is_none() {
                                s.down_since = Some(Instant::now());
                            }
                            s.connected = false;
                        }
                        tracing::debug!("MQTT link down: {e}");
                        // rumqttc reconnects on the next poll; don't spin on a dead broker.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                Some(ack) = acks.recv() => publish_ack(&client, &topics, &ack).await,
                Some(ack) = reject_rx.recv() => publish_ack(&client, &topics, &ack).await,
                _ = telemetry.tick() => {
                    let body = telemetry_rx
                        .borrow_and_update()
                        .as_ref()
                        .and_then(|t| serde_json::to_string(t).ok());
                    let connected = state.lock().unwrap_or_else(|e| e.into_inner()).connected;
                    if let (Some(body), true) = (body, connected) {
                        let _ = client.publish(&topics.telemetry, QoS::AtMostOnce, false, body).await;
                    }
                }
            }
        }
    });
}

async fn publish_ack(client: &AsyncClient, topics: &Topics, ack: &Ack) {
    if let Ok(body) = serde_json::to_string(ack) {
        let _ = client
            .publish(&topics.ack, QoS::AtLeastOnce, false, body)
            .await;
    }
}

/// An event or a cancel from the events topic. Returns an ack for input the book never saw
/// (unreadable JSON, an unknown id to cancel); the book acknowledges everything else itself.
async fn receive(book: &SharedBook, payload: &[u8]) -> Option<Ack> {
    let rejected = |id: String, reason: String| Ack {
        id,
        status: "rejected".into(),
        reason: Some(reason),
        source: "mqtt".into(),
    };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
        if let Some(id) = v.get("cancel").and_then(|c| c.as_str()) {
            let r = book.cancel(id).await;
            return r.err().map(|e| rejected(id.to_string(), e.to_string()));
        }
    }
    let request: EventRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from))
                .unwrap_or_default();
            return Some(rejected(id, format!("bad event JSON: {e}")));
        }
    };
    let id = request.id.clone();
    let event = match request.into_event("mqtt") {
        Ok(e) => e,
        Err(why) => return Some(rejected(id, why)),
    };
    // The book acks accepted and refused events alike.
    let _ = book.submit(event).await;
    None
}
