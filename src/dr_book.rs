//! The demand-response event book: accepted events and their state, kept in the SQLite store
//! so that after a crash and restart every event still in force is enforced before the
//! first write — none lost, none duplicated.

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::dr::DrEvent;

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
    fn as_str(self) -> &'static str {
        match self {
            EventState::Accepted => "accepted",
            EventState::Active => "active",
            EventState::Ended => "ended",
            EventState::Cancelled => "cancelled",
        }
    }
    fn parse(s: &str) -> EventState {
        match s {
            "active" => EventState::Active,
            "ended" => EventState::Ended,
            "cancelled" => EventState::Cancelled,
            _ => EventState::Accepted,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub event: DrEvent,
    pub state: EventState,
}

/// An acknowledgement for the aggregator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub id: String,
    /// `accepted`, `rejected`, `active`, `ended`, `cancelled`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub source: String,
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
}

pub struct DrBook {
    conn: Option<Connection>,
    entries: Vec<Entry>,
    acks: Vec<Ack>,
    /// Counts changes (accepted, cancelled, started, ended) so readers can tell.
    generation: u64,
}

fn store_err(e: rusqlite::Error) -> BookError {
    BookError::Store(e.to_string())
}

impl DrBook {
    /// A book kept in memory only (no store configured).
    pub fn in_memory() -> DrBook {
        DrBook {
            conn: None,
            entries: Vec::new(),
            acks: Vec::new(),
            generation: 0,
        }
    }

    /// Changes so far: a new value means the events in force may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Open the book in the SQLite file, loading every event not yet over.
    pub fn open(path: &Path) -> rusqlite::Result<DrBook> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS dr_events (
                 id TEXT PRIMARY KEY,
                 event TEXT NOT NULL,   -- the event as JSON
                 state TEXT NOT NULL
             );",
        )?;
        let mut entries = Vec::new();
        {
            let mut q = conn.prepare(
                "SELECT event, state FROM dr_events WHERE state IN ('accepted', 'active')",
            )?;
            let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (json, state) = row?;
                match serde_json::from_str::<DrEvent>(&json) {
                    Ok(event) => entries.push(Entry {
                        event,
                        state: EventState::parse(&state),
                    }),
                    Err(e) => tracing::error!("stored DR event unreadable, skipped: {e}"),
                }
            }
        }
        Ok(DrBook {
            conn: Some(conn),
            entries,
            acks: Vec::new(),
            generation: 0,
        })
    }

    fn save(&self, e: &Entry) -> Result<(), BookError> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        let json = serde_json::to_string(&e.event).map_err(|x| BookError::Store(x.to_string()))?;
        conn.execute(
            "INSERT INTO dr_events (id, event, state) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET event = excluded.event, state = excluded.state",
            params![e.event.id, json, e.state.as_str()],
        )
        .map_err(store_err)?;
        Ok(())
    }

    fn known(&self, id: &str) -> Result<bool, BookError> {
        if self.entries.iter().any(|e| e.event.id == id) {
            return Ok(true);
        }
        match &self.conn {
            Some(conn) => conn
                .query_row(
                    "SELECT COUNT(*) FROM dr_events WHERE id = ?1",
                    params![id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)
                .map_err(store_err),
            None => Ok(false),
        }
    }

    /// Accept an event: checked, stored, acknowledged. Ids are unique for ever, so a
    /// repeated delivery is refused rather than applied twice.
    pub fn add(&mut self, event: DrEvent) -> Result<Entry, BookError> {
        let refuse = |acks: &mut Vec<Ack>, e: BookError, event: &DrEvent| {
            acks.push(Ack {
                id: event.id.clone(),
                status: "rejected".into(),
                reason: Some(e.to_string()),
                source: event.source.clone(),
            });
            Err(e)
        };
        if event.id.trim().is_empty() || event.id.len() > 128 {
            return refuse(
                &mut self.acks,
                BookError::Invalid("id must be 1–128 characters".into()),
                &event,
            );
        }
        if event.end <= event.start {
            return refuse(
                &mut self.acks,
                BookError::Invalid("end must be after start".into()),
                &event,
            );
        }
        if let Err(why) = event.command.validate() {
            return refuse(&mut self.acks, BookError::Invalid(why), &event);
        }
        if self.known(&event.id)? {
            let id = event.id.clone();
            return refuse(&mut self.acks, BookError::Duplicate(id), &event);
        }
        let entry = Entry {
            event,
            state: EventState::Accepted,
        };
        self.save(&entry)?;
        self.acks.push(Ack {
            id: entry.event.id.clone(),
            status: "accepted".into(),
            reason: None,
            source: entry.event.source.clone(),
        });
        self.entries.push(entry.clone());
        self.generation += 1;
        Ok(entry)
    }

    pub fn cancel(&mut self, id: &str) -> Result<(), BookError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.event.id == id)
            .ok_or_else(|| BookError::NotFound(id.to_string()))?;
        let mut entry = self.entries.remove(i);
        entry.state = EventState::Cancelled;
        self.generation += 1;
        self.save(&entry)?;
        self.acks.push(Ack {
            id: id.to_string(),
            status: "cancelled".into(),
            reason: None,
            source: entry.event.source,
        });
        Ok(())
    }

    /// Move events through their states at `now`. True if anything started or ended.
    pub fn tick(&mut self, now: DateTime<Utc>) -> bool {
        let mut changed = false;
        let mut done = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            let next = if now >= e.event.end {
                EventState::Ended
            } else if now >= e.event.start {
                EventState::Active
            } else {
                EventState::Accepted
            };
            if next != e.state {
                e.state = next;
                changed = true;
                self.acks.push(Ack {
                    id: e.event.id.clone(),
                    status: next.as_str().into(),
                    reason: None,
                    source: e.event.source.clone(),
                });
                if next == EventState::Ended {
                    done.push(i);
                }
            }
        }
        if changed {
            self.generation += 1;
            for e in &self.entries {
                if let Err(err) = self.save(e) {
                    tracing::error!("DR event state not stored: {err}");
                }
            }
        }
        for i in done.into_iter().rev() {
            self.entries.remove(i);
        }
        changed
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

    pub fn events(&self) -> Vec<DrEvent> {
        self.entries.iter().map(|e| e.event.clone()).collect()
    }

    /// Acknowledgements since the last call.
    pub fn take_acks(&mut self) -> Vec<Ack> {
        std::mem::take(&mut self.acks)
    }
}
