//! The guard loop's side of demand response: each cycle it moves the book's events through
//! their states (in memory), forwards the acknowledgements, adds the contact inputs and the
//! MQTT fallback, and resolves what is in force into constraints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::config::SiteConfig;
use crate::dr::book::{Ack, SharedBook};
use crate::dr::mqtt::LinkState;
use crate::dr::{DrCommand, DrConstraints, DrEvent, LevelLimits};
use crate::web::metrics::Metrics;
use crate::web::status::DrStatus;

/// The aggregator's MQTT link as the loop sees it.
pub struct MqttSide {
    pub state: Arc<Mutex<LinkState>>,
    pub acks: mpsc::UnboundedSender<Ack>,
    pub heartbeat: Duration,
    pub fallback: LevelLimits,
}

pub struct Demand {
    pub book: SharedBook,
    mqtt: Option<MqttSide>,
    fleet_rated_w: f64,
    levels: [LevelLimits; 4],
    constraints: DrConstraints,
    generation: u64,
}

impl Demand {
    pub fn new(config: &SiteConfig, book: SharedBook, mqtt: Option<MqttSide>) -> Demand {
        Demand {
            book,
            mqtt,
            fleet_rated_w: config.inverters.iter().map(|i| i.rated_power_w).sum(),
            levels: config.dr_settings().openadr_levels,
            constraints: DrConstraints::default(),
            generation: 0,
        }
    }

    /// One cycle at `now`, with the DRMs the contacts hold: the constraints in force.
    pub fn cycle(
        &mut self,
        now: DateTime<Utc>,
        contact_events: Vec<DrEvent>,
        metrics: &Metrics,
    ) -> &DrConstraints {
        let (generation, acks) = self.book.tick(now);
        self.generation = generation;
        for ack in acks {
            metrics.count_dr_ack(&ack.status);
            if let Some(m) = &self.mqtt {
                let _ = m.acks.send(ack);
            }
        }
        let book_events = self.book.lock().events();
        let extra: Vec<DrEvent> = contact_events
            .into_iter()
            .chain(self.fallback_events(now))
            .collect();
        self.constraints = if extra.is_empty() {
            crate::dr::resolve(&book_events, now, self.fleet_rated_w, &self.levels)
        } else {
            let all: Vec<DrEvent> = book_events.iter().cloned().chain(extra).collect();
            crate::dr::resolve(&all, now, self.fleet_rated_w, &self.levels)
        };
        &self.constraints
    }

    /// The book's generation and events, for the planner.
    pub fn book_state(&self) -> (u64, Arc<[DrEvent]>) {
        (self.generation, self.book.lock().events())
    }

    pub fn constraints(&self) -> &DrConstraints {
        &self.constraints
    }

    /// The aggregator link has been down longer than its heartbeat.
    fn link_lost(&self) -> bool {
        self.mqtt.as_ref().is_some_and(|m| {
            m.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lost_for(m.heartbeat)
        })
    }

    /// The site's fallback limits while the aggregator link is lost, as events in force now.
    fn fallback_events(&self, now: DateTime<Utc>) -> Vec<DrEvent> {
        let Some(m) = self.mqtt.as_ref().filter(|_| self.link_lost()) else {
            return Vec::new();
        };
        let event = |id: &str, command| DrEvent {
            id: id.into(),
            start: now - chrono::Duration::seconds(1),
            end: now + chrono::Duration::seconds(1),
            priority: 0,
            command,
            source: "fallback".into(),
        };
        let export = m
            .fallback
            .export_limit_w
            .map(|w| event("mqtt-fallback-export", DrCommand::ExportLimitW(w)));
        let import = m
            .fallback
            .import_limit_w
            .map(|w| event("mqtt-fallback-import", DrCommand::ImportLimitW(w)));
        export.into_iter().chain(import).collect()
    }

    pub fn status(&self) -> DrStatus {
        DrStatus {
            events: self.book.lock().len(),
            constraints: self.constraints.clone(),
            mqtt_connected: self.mqtt.as_ref().map(|m| {
                m.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .connected()
            }),
            mqtt_error: self.mqtt.as_ref().and_then(|m| {
                m.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .error()
                    .map(String::from)
            }),
            fallback: self.link_lost(),
        }
    }
}
