//! The demand-response event book: accepted events and their state.
//!
//! [`DrBook`] is the book in memory — pure, quick, what the guard loop reads each cycle
//! under a lock held for microseconds. [`SharedBook`] is how the rest of the EMS changes it:
//! an aggregator's event is written to the store first and enters the book only once it is
//! on disk, so after a crash and restart every event still in force is enforced before the
//! first write — none lost, none duplicated. Nothing that touches the disk runs under the
//! book's lock.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::dr::{DrCommand, DrEvent};
use crate::store::writer::Writer;
use crate::store::StoredEvent;

/// How long an aggregator's request may wait for the disk before it is refused.
const STORE_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    /// Accepted, not started yet.
    Accepted,
    Active,
    Ended,
    Cancelled,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Accepted => "accepted",
            EventState::Active => "active",
            EventState::Ended => "ended",
            EventState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<EventState> {
        Some(match s {
            "accepted" => EventState::Accepted,
            "active" => EventState::Active,
            "ended" => EventState::Ended,
            "cancelled" => EventState::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub event: DrEvent,
    pub state: EventState,
}

impl Entry {
    fn stored(&self) -> Result<StoredEvent, BookError> {
        Ok(StoredEvent {
            id: self.event.id.clone(),
            json: serde_json::to_string(&self.event)
                .map_err(|e| BookError::Store(e.to_string()))?,
            state: self.state.as_str().into(),
        })
    }
}

/// An acknowledgement for the aggregator.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Ack {
    pub id: String,
    /// `accepted`, `rejected`, `active`, `ended`, `cancelled`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub source: String,
}

impl Ack {
    /// One per event and status: where the outbox keeps it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.id, self.status)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BookError {
    #[error("{0}")]
    Invalid(String),
    #[error("an event with id `{0}` exists already")]
    Duplicate(String),
    #[error("no event with id `{0}`")]
    NotFound(String),
    #[error("the store failed: {0}")]
    Store(String),
    /// Over the number of events the book may hold, or the rate it accepts them at.
    #[error("{0}")]
    TooMany(String),
    /// Not this source's to change.
    #[error("{0}")]
    Forbidden(String),
}

/// Sources that stand for the grid operator: what they put in force only they can clear.
pub const GRID_OPERATOR_SOURCES: [&str; 2] = ["dred", "ripple"];

/// How many aggregator events the book takes: in it at once, and accepted per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intake {
    pub max_events: usize,
    pub max_per_min: u32,
    /// What the fleet's batteries can do, W (most charge, most discharge): a
    /// `fleet_battery_w` outside it is refused, not clamped out of sight later.
    pub fleet_battery_w: Option<(f64, f64)>,
    /// What the grid connection carries, W over all phases (from the site's import limit,
    /// its main fuse): an export or import limit, or a grid target, beyond it is refused.
    pub connection_w: Option<f64>,
}

impl Intake {
    /// Whether the site can physically do what `command` asks.
    fn feasible(&self, command: &DrCommand) -> Result<(), BookError> {
        if let (DrCommand::FleetBatteryW(w), Some((charge, discharge))) =
            (command, self.fleet_battery_w)
        {
            if *w < -charge || *w > discharge {
                return Err(BookError::Invalid(format!(
                    "fleet_battery_w {w} W is beyond what the fleet can do: −{charge:.0} W (charge) to {discharge:.0} W (discharge)"
                )));
            }
        }
        let beyond = |what: &str, w: f64, cap: f64| {
            Err(BookError::Invalid(format!(
                "{what} {w} W is beyond the grid connection: it carries at most {cap:.0} W (the site's import limit)"
            )))
        };
        match (command, self.connection_w) {
            (DrCommand::ExportLimitW(w), Some(cap)) if *w > cap => {
                beyond("export_limit_w", *w, cap)
            }
            (DrCommand::ImportLimitW(w), Some(cap)) if *w > cap => {
                beyond("import_limit_w", *w, cap)
            }
            (DrCommand::GridTargetW(w), Some(cap)) if w.abs() > cap => {
                beyond("grid_target_w", *w, cap)
            }
            _ => Ok(()),
        }
    }
}

impl Default for Intake {
    fn default() -> Intake {
        // The site file's defaults.
        let d = crate::config::DrConfig::default();
        Intake {
            max_events: d.max_events,
            max_per_min: d.max_events_per_min,
            fleet_battery_w: None,
            connection_w: None,
        }
    }
}

/// The book in memory.
#[derive(Debug, Default)]
pub struct DrBook {
    entries: Vec<Entry>,
    /// Every id ever accepted (from the store at start): ids are unique for ever.
    known: HashSet<String>,
    acks: Vec<Ack>,
    /// Counts changes (accepted, cancelled, started, ended) so readers can tell.
    generation: u64,
    /// The events not over yet, shared with readers without copying them.
    events: Arc<[DrEvent]>,
}

impl DrBook {
    /// The book as stored: every id, and the events not over yet.
    pub fn from_stored(rows: Vec<StoredEvent>) -> DrBook {
        let mut book = DrBook::default();
        for row in rows {
            book.known.insert(row.id.clone());
            let state = EventState::parse(&row.state);
            if !matches!(state, Some(EventState::Accepted | EventState::Active)) {
                continue;
            }
            match serde_json::from_str::<DrEvent>(&row.json) {
                Ok(event) => book.entries.push(Entry {
                    event,
                    state: state.unwrap_or(EventState::Accepted),
                }),
                Err(e) => tracing::error!("stored DR event {} unreadable, skipped: {e}", row.id),
            }
        }
        book.changed();
        book
    }

    fn changed(&mut self) {
        self.generation += 1;
        self.events = self.entries.iter().map(|e| e.event.clone()).collect();
    }

    /// Changes so far: a new value means the events in force may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn reject(&mut self, event: &DrEvent, e: BookError) -> BookError {
        self.acks.push(Ack {
            id: event.id.clone(),
            status: "rejected".into(),
            reason: Some(e.to_string()),
            source: event.source.clone(),
        });
        e
    }

    /// Whether `event` may be accepted: well-formed and never seen. A refusal is
    /// acknowledged as rejected.
    pub fn check(&mut self, event: &DrEvent) -> Result<(), BookError> {
        let invalid = if event.id.trim().is_empty() || event.id.len() > 128 {
            Some("id must be 1–128 characters".to_string())
        } else if event.end <= event.start {
            Some("end must be after start".to_string())
        } else {
            event.command.validate().err()
        };
        if let Some(why) = invalid {
            return Err(self.reject(event, BookError::Invalid(why)));
        }
        if self.known.contains(&event.id) {
            return Err(self.reject(event, BookError::Duplicate(event.id.clone())));
        }
        Ok(())
    }

    /// Put a checked event in the book and acknowledge it.
    pub fn insert(&mut self, event: DrEvent) -> Entry {
        let entry = Entry {
            event,
            state: EventState::Accepted,
        };
        self.known.insert(entry.event.id.clone());
        self.acks.push(Ack {
            id: entry.event.id.clone(),
            status: "accepted".into(),
            reason: None,
            source: entry.event.source.clone(),
        });
        self.entries.push(entry.clone());
        self.changed();
        entry
    }

    /// Check and insert in one step (a book without a store).
    pub fn add(&mut self, event: DrEvent) -> Result<Entry, BookError> {
        self.check(&event)?;
        Ok(self.insert(event))
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.event.id == id)
    }

    /// Take a cancelled event out of the book and acknowledge it.
    pub fn remove_cancelled(&mut self, id: &str) -> Result<Entry, BookError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.event.id == id)
            .ok_or_else(|| BookError::NotFound(id.to_string()))?;
        let mut entry = self.entries.remove(i);
        entry.state = EventState::Cancelled;
        self.acks.push(Ack {
            id: id.to_string(),
            status: "cancelled".into(),
            reason: None,
            source: entry.event.source.clone(),
        });
        self.changed();
        Ok(entry)
    }

    /// Move events through their states at `now`; returns the entries whose state changed
    /// (ended ones leave the book).
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Entry> {
        let mut moved = Vec::new();
        for e in self.entries.iter_mut() {
            let next = if now >= e.event.end {
                EventState::Ended
            } else if now >= e.event.start {
                EventState::Active
            } else {
                EventState::Accepted
            };
            if next != e.state {
                e.state = next;
                self.acks.push(Ack {
                    id: e.event.id.clone(),
                    status: next.as_str().into(),
                    reason: None,
                    source: e.event.source.clone(),
                });
                moved.push(e.clone());
            }
        }
        if !moved.is_empty() {
            self.entries.retain(|e| e.state != EventState::Ended);
            self.changed();
        }
        moved
    }

    /// Events not yet over, with their state.
    pub fn list(&self) -> Vec<Entry> {
        self.entries.clone()
    }

    /// Events not yet over.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The events not yet over, shared.
    pub fn events(&self) -> Arc<[DrEvent]> {
        self.events.clone()
    }

    /// Acknowledgements since the last call.
    pub fn take_acks(&mut self) -> Vec<Ack> {
        std::mem::take(&mut self.acks)
    }
}

/// The book as the EMS shares it: the guard loop reads, the API, the MQTT link and the
/// contact inputs change it. Changes from aggregators are serialised and wait for the disk
/// outside the book's lock.
#[derive(Clone)]
pub struct SharedBook {
    book: Arc<Mutex<DrBook>>,
    /// One aggregator change at a time: the duplicate check and the insert see the same book.
    /// One aggregator change at a time, and when recent events were accepted (for the rate).
    changes: Arc<tokio::sync::Mutex<std::collections::VecDeque<tokio::time::Instant>>>,
    writer: Option<Writer>,
    intake: Intake,
}

impl SharedBook {
    /// A book kept in memory only (no store configured).
    pub fn in_memory() -> SharedBook {
        SharedBook::new(DrBook::default(), None)
    }

    pub fn new(book: DrBook, writer: Option<Writer>) -> SharedBook {
        SharedBook {
            book: Arc::new(Mutex::new(book)),
            changes: Arc::new(tokio::sync::Mutex::new(Default::default())),
            writer,
            intake: Intake::default(),
        }
    }

    /// The same book, taking aggregator events within `intake`.
    pub fn with_intake(mut self, intake: Intake) -> SharedBook {
        self.intake = intake;
        self
    }

    /// Whether one more aggregator event fits, now.
    fn room(
        &self,
        accepted: &mut std::collections::VecDeque<tokio::time::Instant>,
    ) -> Result<(), BookError> {
        let now = tokio::time::Instant::now();
        while accepted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            accepted.pop_front();
        }
        let held = self.lock().len();
        if held >= self.intake.max_events {
            return Err(BookError::TooMany(format!(
                "the book holds {held} events, its limit (dr.max_events); cancel some or wait for them to end"
            )));
        }
        if accepted.len() >= self.intake.max_per_min as usize {
            return Err(BookError::TooMany(format!(
                "more than {} events in a minute (dr.max_events_per_min); try again later",
                self.intake.max_per_min
            )));
        }
        Ok(())
    }

    /// The book in memory, for a quick look or a change that needs no disk. Never held
    /// across an await.
    pub fn lock(&self) -> MutexGuard<'_, DrBook> {
        // A panic while holding the lock leaves a consistent list behind; keep using it.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept an aggregator's event: checked, written to the store, then in force.
    pub async fn submit(&self, event: DrEvent) -> Result<Entry, BookError> {
        let mut accepted = self.changes.lock().await;
        if let Err(e) = self
            .intake
            .feasible(&event.command)
            .and_then(|()| self.room(&mut accepted))
        {
            return Err(self.lock().reject(&event, e));
        }
        self.lock().check(&event)?;
        if let Some(w) = &self.writer {
            let entry = Entry {
                event: event.clone(),
                state: EventState::Accepted,
            };
            if let Err(why) = w.event_now(entry.stored()?, STORE_DEADLINE).await {
                let e = BookError::Store(why);
                return Err(self.lock().reject(&event, e));
            }
        }
        accepted.push_back(tokio::time::Instant::now());
        Ok(self.lock().insert(event))
    }

    /// Cancel an event for an aggregator (`by`: `http`, `mqtt`): the cancellation is on disk
    /// before the event stops being in force. A grid operator's input is not theirs to clear.
    pub async fn cancel(&self, id: &str, by: &str) -> Result<(), BookError> {
        let _one_at_a_time = self.changes.lock().await;
        let entry = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| BookError::NotFound(id.to_string()))?;
        let source = entry.event.source.as_str();
        if source != by && GRID_OPERATOR_SOURCES.contains(&source) {
            return Err(BookError::Forbidden(format!(
                "`{id}` is the grid operator's ({source}): only its own input clears it"
            )));
        }
        if let Some(w) = &self.writer {
            let cancelled = Entry {
                state: EventState::Cancelled,
                ..entry
            };
            w.event_now(cancelled.stored()?, STORE_DEADLINE)
                .await
                .map_err(BookError::Store)?;
        }
        self.lock().remove_cancelled(id).map(|_| ())
    }

    /// A grid operator's input (a latched ripple-control step): in force at once, on disk
    /// as soon as the store allows. Earlier events from the same `source` are replaced.
    pub fn latch(&self, event: DrEvent) -> Result<(), BookError> {
        let mut book = self.lock();
        let old: Vec<String> = book
            .entries
            .iter()
            .filter(|e| e.event.source == event.source)
            .map(|e| e.event.id.clone())
            .collect();
        for id in old {
            if let Ok(entry) = book.remove_cancelled(&id) {
                self.store_later(&entry);
            }
        }
        book.check(&event)?;
        let entry = book.insert(event);
        self.store_later(&entry);
        Ok(())
    }

    /// Move events through their states (memory only; the new states are queued for disk).
    pub fn tick(&self, now: DateTime<Utc>) -> (u64, Vec<Ack>) {
        let mut book = self.lock();
        for entry in book.tick(now) {
            self.store_later(&entry);
        }
        (book.generation(), book.take_acks())
    }

    fn store_later(&self, entry: &Entry) {
        match (&self.writer, entry.stored()) {
            (Some(w), Ok(stored)) => w.event_later(stored),
            (Some(_), Err(e)) => tracing::error!("DR event {} not stored: {e}", entry.event.id),
            (None, _) => {}
        }
    }
}
