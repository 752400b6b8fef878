//! The DRED / ripple-control contact input: a Modbus digital-input module read with FC02
//! every cycle. A DRM is in force while its contact is closed; a ripple-control step arrives
//! as a short pulse and is latched — kept in the DR book — until the next step's pulse.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::config::ContactsConfig;
use crate::dr::book::SharedBook;
use crate::dr::{DrCommand, DrEvent};
use crate::drivers::ReadBlock;
use crate::io::link::Link;

/// Ripple-control steps, in the order of `ripple_inputs`.
pub const RIPPLE_STEPS: [f64; 4] = [100.0, 60.0, 30.0, 0.0];

/// Contact states outrank aggregator events: they are the grid operator's.
const PRIORITY: i32 = 1000;

pub struct Contacts {
    cfg: ContactsConfig,
    link: Link,
    device: Arc<str>,
    drm: [bool; 9],
    ripple: [bool; 4],
    pub error: Option<String>,
}

impl Contacts {
    pub fn new(cfg: ContactsConfig, link: Link) -> Contacts {
        Contacts {
            device: Arc::from("dr-contacts"),
            cfg,
            link,
            drm: [false; 9],
            ripple: [false; 4],
            error: None,
        }
    }

    /// Read the contacts; record ripple pulses in `book`. If the module does not answer,
    /// the last known DRM contacts stay in force.
    pub async fn poll(&mut self, now: DateTime<Utc>, book: &SharedBook) {
        let Some((start, count)) = self.cfg.span() else {
            return;
        };
        let bits = match self
            .link
            .read(
                &self.device,
                self.cfg.unit_id,
                ReadBlock::discrete(start, count),
            )
            .await
        {
            Ok(bits) => bits,
            Err(e) => {
                self.error = Some(e.to_string());
                return;
            }
        };
        self.error = None;
        let closed = |addr: u16| bits.get(usize::from(addr - start)).is_some_and(|b| *b != 0);
        if let Some(addrs) = self.cfg.drm_inputs {
            for (k, a) in addrs.iter().enumerate() {
                self.drm[k] = closed(*a);
            }
        }
        if let Some(addrs) = self.cfg.ripple_inputs {
            for (k, a) in addrs.iter().enumerate() {
                let on = closed(*a);
                if on && !self.ripple[k] {
                    self.latch(RIPPLE_STEPS[k], now, book);
                }
                self.ripple[k] = on;
            }
        }
    }

    fn latch(&self, pct: f64, now: DateTime<Utc>, book: &SharedBook) {
        let event = DrEvent {
            id: format!("ripple-{pct:.0}-{}", now.timestamp_millis()),
            start: now,
            end: now + chrono::Duration::days(3650),
            priority: PRIORITY,
            command: DrCommand::RipplePct(pct),
            source: "ripple".into(),
        };
        if let Err(e) = book.latch(event) {
            tracing::error!("ripple-control step {pct} % not latched: {e}");
        }
    }

    /// The DRMs whose contacts are closed, as events in force now.
    pub fn drm_events(&self, now: DateTime<Utc>) -> Vec<DrEvent> {
        self.drm
            .iter()
            .enumerate()
            .filter(|(_, on)| **on)
            .map(|(m, _)| DrEvent {
                id: format!("dred-drm{m}"),
                start: now - chrono::Duration::seconds(1),
                end: now + chrono::Duration::seconds(1),
                priority: PRIORITY,
                command: DrCommand::Drm(m as u8),
                source: "dred".into(),
            })
            .collect()
    }
}
