//! The aggregator's MQTT link (rumqttc): demand-response events in, acknowledgements and
//! telemetry out. The link's state drives the fallback: down longer than the heartbeat, the
//! site's fallback limits apply until it is back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};

use crate::config::MqttConfig;
use crate::dr::book::{Ack, SharedBook};
use crate::dr::wire::EventRequest;
use crate::store::writer::Writer;

/// What the site tells its aggregator every `telemetry_s`: the loop publishes it each cycle.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Telemetry {
    pub time: String,
    pub grid_power_w: Option<f64>,
    pub fleet_soc_pct: Option<f64>,
    pub export_limit_w: Option<f64>,
    pub dr: crate::dr::DrConstraints,
}

/// Whether the broker is reachable, since when it is not, and why.
#[derive(Debug, Default)]
pub struct LinkState {
    connected: bool,
    down_since: Option<Instant>,
    last_error: Option<String>,
}

impl LinkState {
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Down for longer than `heartbeat` (or never up since start).
    pub fn lost_for(&self, heartbeat: Duration) -> bool {
        !self.connected && self.down_since.is_some_and(|t| t.elapsed() >= heartbeat)
    }

    /// Why the link last failed (a refused login, say), while it is down.
    pub fn error(&self) -> Option<&str> {
        self.last_error.as_deref().filter(|_| !self.connected)
    }

    fn up(&mut self) {
        self.connected = true;
        self.down_since = None;
        self.last_error = None;
    }

    fn down(&mut self, why: Option<String>) {
        if self.connected || self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
        self.connected = false;
        self.last_error = why;
    }
}

pub struct Topics {
    pub events: String,
    /// One per group the site belongs to.
    pub group_events: Vec<String>,
    pub ack: String,
    pub telemetry: String,
    pub status: String,
}

impl Topics {
    pub fn new(cfg: &MqttConfig) -> Topics {
        let p = cfg.topic_prefix.trim_end_matches('/');
        let g = cfg.groups_prefix.trim_end_matches('/');
        Topics {
            events: format!("{p}/dr/events"),
            group_events: cfg
                .groups
                .iter()
                .map(|group| format!("{g}/{group}/dr/events"))
                .collect(),
            ack: format!("{p}/dr/ack"),
            telemetry: format!("{p}/telemetry"),
            status: format!("{p}/status"),
        }
    }

    fn is_events(&self, topic: &str) -> bool {
        topic == self.events || self.group_events.iter().any(|t| t == topic)
    }
}

/// The client id: the configured one, or one no other site on the broker has — two
/// clients with one id take the connection from each other in turn.
pub fn client_id(cfg: &MqttConfig) -> String {
    use std::hash::{BuildHasher, Hasher};
    if let Some(id) = &cfg.client_id {
        return id.clone();
    }
    // RandomState is seeded afresh by each process: a new suffix at each start.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("site-ems-{}-{:08x}", cfg.site_id(), h.finish() as u32)
}

fn options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(client_id(cfg), &cfg.host, cfg.port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_last_will(LastWill::new(
        &topics.status,
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_env {
            Some(var) => {
                std::env::var(var).map_err(|_| format!("the password variable {var} is not set"))?
            }
            None => String::new(),
        };
        o.set_credentials(user, password);
    }
    if let Some(ca) = &cfg.ca_file {
        crate::tls_ready();
        let ca = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }));
    }
    Ok(o)
}

/// Acks handed to rumqttc but not yet confirmed by the broker, at most this many: the
/// client's request queue (256) can then never fill, so no publish ever waits.
const ACK_WINDOW: usize = 32;

/// Acknowledgements on their way to the broker. An ack leaves only when the broker has
/// confirmed it (PUBACK); if the link drops first it goes back to the front and is sent
/// again after the reconnect. rumqttc drops what it had in flight when it starts a new
/// session, so the outbox, not the client, is where an ack is kept — in the store too,
/// when there is one, so a restart does not lose it either.
#[derive(Default)]
struct Outbox {
    store: Option<Writer>,
    waiting: VecDeque<Ack>,
    /// Publishes requested from the client, in order, not yet written (`None`: not an ack).
    requested: VecDeque<Option<Ack>>,
    /// Written, by packet id, awaiting the broker's PUBACK.
    in_flight: Vec<(u16, Ack)>,
}

impl Outbox {
    fn busy(&self) -> usize {
        self.requested.iter().filter(|r| r.is_some()).count() + self.in_flight.len()
    }

    /// The client wrote a publish with packet id `pkid`.
    fn written(&mut self, pkid: u16) {
        if let Some(Some(ack)) = self.requested.pop_front() {
            self.in_flight.push((pkid, ack));
        }
    }

    /// A new ack: kept (on disk too) until the broker has it.
    fn add(&mut self, ack: Ack) {
        if let (Some(w), Ok(json)) = (&self.store, serde_json::to_string(&ack)) {
            w.outbox(&ack.key(), Some(json));
        }
        self.waiting.push_back(ack);
    }

    /// The broker confirmed `pkid`: that ack is delivered.
    fn confirmed(&mut self, pkid: u16) {
        let store = &self.store;
        self.in_flight.retain(|(p, ack)| {
            let done = *p == pkid;
            if let (true, Some(w)) = (done, store) {
                w.outbox(&ack.key(), None);
            }
            !done
        });
    }

    /// The link dropped: everything not confirmed is sent again, in its order.
    fn requeue(&mut self) {
        let mut again: Vec<Ack> = self.in_flight.drain(..).map(|(_, a)| a).collect();
        again.extend(self.requested.drain(..).flatten());
        for ack in again.into_iter().rev() {
            self.waiting.push_front(ack);
        }
    }
}

/// The link as one task: it polls the client's event loop and publishes with `try_publish`
/// only, so nothing it does waits on the broker.
struct Link {
    cfg: MqttConfig,
    topics: Topics,
    site: String,
    client: AsyncClient,
    state: Arc<Mutex<LinkState>>,
    outbox: Outbox,
}

impl Link {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connected(&mut self) {
        self.state().up();
        tracing::info!("MQTT connected to {}:{}", self.cfg.host, self.cfg.port);
        for topic in std::iter::once(&self.topics.events).chain(&self.topics.group_events) {
            let _ = self.client.try_subscribe(topic, QoS::AtLeastOnce);
        }
        self.publish(
            &self.topics.status.clone(),
            QoS::AtLeastOnce,
            true,
            "online".into(),
            None,
        );
        self.send_acks();
    }

    fn lost(&mut self, why: String) {
        if self.state().connected() {
            tracing::warn!(
                "MQTT link to {}:{} down: {why}",
                self.cfg.host,
                self.cfg.port
            );
        }
        self.state().down(Some(why));
        self.outbox.requeue();
    }

    fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        body: String,
        ack: Option<Ack>,
    ) -> bool {
        match self.client.try_publish(topic, qos, retain, body) {
            Ok(()) => {
                self.outbox.requested.push_back(ack);
                true
            }
            Err(_) => {
                if let Some(ack) = ack {
                    self.outbox.waiting.push_front(ack);
                }
                false
            }
        }
    }

    /// Hand waiting acks to the client while connected and the window has room.
    fn send_acks(&mut self) {
        while self.state().connected() && self.outbox.busy() < ACK_WINDOW {
            let Some(ack) = self.outbox.waiting.pop_front() else {
                return;
            };
            let body = with_site(&ack, &self.site);
            let topic = self.topics.ack.clone();
            if !self.publish(&topic, QoS::AtLeastOnce, false, body, Some(ack)) {
                return;
            }
        }
    }

    fn telemetry(&mut self, t: &Telemetry) {
        if !self.state().connected() {
            return;
        }
        // At most once and never queued: a message the client has no room for is dropped,
        // the next one says the same, newer.
        if let Ok(mut v) = serde_json::to_value(t) {
            v["site"] = serde_json::Value::String(self.site.clone());
            let topic = self.topics.telemetry.clone();
            self.publish(&topic, QoS::AtMostOnce, false, v.to_string(), None);
        }
    }

    fn on_event(
        &mut self,
        ev: Result<Event, rumqttc::ConnectionError>,
        inbox: &mpsc::UnboundedSender<Vec<u8>>,
    ) {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.connected(),
            Ok(Event::Incoming(Packet::Publish(p))) if self.topics.is_events(&p.topic) => {
                let _ = inbox.send(p.payload.to_vec());
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.outbox.written(pkid),
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                self.outbox.confirmed(a.pkid);
                self.send_acks();
            }
            Ok(_) => {}
            Err(e) => self.lost(e.to_string()),
        }
    }
}

/// The ack as JSON, with the site it comes from.
fn with_site(ack: &Ack, site: &str) -> String {
    let mut v = serde_json::to_value(ack).unwrap_or_default();
    v["site"] = serde_json::Value::String(site.to_string());
    v.to_string()
}

/// Run the link until the process ends: reconnects by itself. `pending`: acks an earlier
/// run kept in `store` that the broker never confirmed; they go out first.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: MqttConfig,
    book: SharedBook,
    store: Option<Writer>,
    pending: Vec<Ack>,
    mut acks: mpsc::UnboundedReceiver<Ack>,
    mut telemetry_rx: watch::Receiver<Option<Telemetry>>,
    state: Arc<Mutex<LinkState>>,
) {
    let topics = Topics::new(&cfg);
    let opts = match options(&cfg, &topics) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("MQTT not started: {e}");
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .down(Some(e));
            return;
        }
    };
    state.lock().unwrap_or_else(|e| e.into_inner()).down(None);
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
        let mut link = Link {
            site: cfg.site_id(),
            cfg,
            topics,
            client,
            state,
            outbox: Outbox {
                store,
                waiting: pending.into(),
                ..Outbox::default()
            },
        };
        let mut telemetry =
            tokio::time::interval(Duration::from_secs_f64(link.cfg.telemetry_s.max(0.1)));
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = eventloop.poll(), if retry_at.is_none() => {
                    let failed = ev.is_err();
                    link.on_event(ev, &inbox);
                    // rumqttc reconnects on the next poll; don't spin on a dead broker.
                    if failed {
                        retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                    }
                }
                _ = retry => retry_at = None,
                ack = acks.recv() => match ack {
                    Some(ack) => {
                        link.outbox.add(ack);
                        link.send_acks();
                    }
                    // The EMS has stopped: so does its link (acks not confirmed stay on disk).
                    None => {
                        let status = link.topics.status.clone();
                        let _ = link.client.try_publish(status, QoS::AtLeastOnce, true, "offline");
                        let _ = link.client.try_disconnect();
                        // Let the event loop write both before it goes.
                        let _ = tokio::time::timeout(Duration::from_millis(500), async {
                            while let Ok(ev) = eventloop.poll().await {
                                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                    break;
                                }
                            }
                        })
                        .await;
                        return;
                    }
                },
                Some(ack) = reject_rx.recv() => {
                    link.outbox.add(ack);
                    link.send_acks();
                }
                _ = telemetry.tick() => {
                    let t = telemetry_rx.borrow_and_update().clone();
                    if let Some(t) = t {
                        link.telemetry(&t);
                    }
                }
            }
        }
    });
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
            let r = book.cancel(id, "mqtt").await;
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
