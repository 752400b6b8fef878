//! The embedded store: one SQLite file with the site's history — one row a minute of load,
//! PV and grid power, from which the planner forecasts load (same weekday, same time, over
//! the last weeks) — and the demand-response event book.
//!
//! Writes go through [`writer::Writer`], a thread of its own that owns the only writing
//! connection: the guard loop hands it rows and never waits on the disk, and a file held
//! locked by another process delays the rows instead of the loop. Readers (the planner's
//! history queries, the book loaded at start) open their own connections; in WAL mode they
//! are not blocked by the writer.

pub mod history;
pub mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

pub use history::MinuteAverage;

/// Tables of the store. Created by whoever opens the file first.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS samples (
        minute INTEGER PRIMARY KEY,  -- unix seconds, start of the minute (UTC)
        load_w REAL NOT NULL,
        pv_w REAL NOT NULL,
        grid_w REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS dr_events (
        id TEXT PRIMARY KEY,
        event TEXT NOT NULL,   -- the event as JSON
        state TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS weather (
        id INTEGER PRIMARY KEY CHECK (id = 1),  -- the latest forecast only
        fetched INTEGER NOT NULL,               -- unix seconds
        body TEXT NOT NULL                      -- the service's response as fetched
    );
    CREATE TABLE IF NOT EXISTS mqtt_outbox (
        key TEXT PRIMARY KEY,        -- event id and status: one ack each
        ack TEXT NOT NULL            -- the ack as JSON, until the broker has confirmed it
    );
    CREATE TABLE IF NOT EXISTS excursions (
        start_ms INTEGER NOT NULL,   -- unix milliseconds
        body TEXT NOT NULL           -- the excursion as JSON
    );
    CREATE INDEX IF NOT EXISTS excursions_start ON excursions (start_ms);
    CREATE TABLE IF NOT EXISTS originals (
        device TEXT NOT NULL,        -- inverter id
        register INTEGER NOT NULL,   -- a control register the EMS takes over
        value INTEGER NOT NULL,      -- the unit's own value before the EMS first wrote it
        PRIMARY KEY (device, register)
    );";

/// Open `path` for reading and writing, with the schema in place. A busy file is waited on
/// for `busy` at most per statement.
fn open_connection(path: &Path, busy: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    // WAL: readers never wait for the writer. FULL: a commit is on disk when it returns,
    // which is what "accepted" promises for a demand-response event.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// One minute of the site, averaged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub minute: DateTime<Utc>,
    pub load_w: f64,
    pub pv_w: f64,
    pub grid_w: f64,
}

/// A demand-response event as stored: its JSON and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: String,
    pub json: String,
    pub state: String,
}

/// A connection for reading (and for direct writes by tools and tests, never by the EMS
/// while it runs: that is the writer's job).
pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        Ok(Store {
            conn: open_connection(path, Duration::from_secs(5))?,
        })
    }

    /// Write a sample directly (imports, tests).
    pub fn insert(&self, s: Sample) -> rusqlite::Result<()> {
        write_sample(
            &self.conn,
            s.minute.timestamp(),
            [s.load_w, s.pv_w, s.grid_w],
        )
    }

    pub fn count(&self) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
    }

    /// Mean load over `[start, start + len)` on each of the `weeks` weeks before `start`
    /// (same weekday, same time), and how many samples that mean is made of.
    pub fn load_history(
        &self,
        start: DateTime<Utc>,
        len_s: i64,
        weeks: u32,
    ) -> rusqlite::Result<(Option<f64>, u32)> {
        let mut sum = 0.0;
        let mut n = 0u32;
        let mut q = self
            .conn
            .prepare_cached("SELECT load_w FROM samples WHERE minute >= ?1 AND minute < ?2")?;
        for w in 1..=i64::from(weeks) {
            let from = start.timestamp() - w * 7 * 86_400;
            let rows = q.query_map(params![from, from + len_s], |r| r.get::<_, f64>(0))?;
            for v in rows {
                sum += v?;
                n += 1;
            }
        }
        Ok(((n > 0).then(|| sum / f64::from(n)), n))
    }

    /// Measured PV per clock hour in `[from, to)`: the hour's start, its mean PV (W) and how
    /// many minutes it is made of.
    pub fn pv_hourly(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> rusqlite::Result<Vec<(DateTime<Utc>, f64, u32)>> {
        let mut q = self.conn.prepare_cached(
            "SELECT (minute / 3600) * 3600 AS h, AVG(pv_w), COUNT(*) FROM samples
             WHERE minute >= ?1 AND minute < ?2 GROUP BY h ORDER BY h",
        )?;
        let rows = q.query_map(params![from.timestamp(), to.timestamp()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, u32>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (h, mean, n) = row?;
            if let Some(t) = DateTime::<Utc>::from_timestamp(h, 0) {
                out.push((t, mean, n));
            }
        }
        Ok(out)
    }

    /// The latest weather forecast fetched, and when.
    pub fn weather(&self) -> rusqlite::Result<Option<(String, DateTime<Utc>)>> {
        let row = self
            .conn
            .query_row("SELECT body, fetched FROM weather WHERE id = 1", [], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            });
        match row {
            Ok((body, at)) => Ok(DateTime::<Utc>::from_timestamp(at, 0).map(|t| (body, t))),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Acks for the aggregator the broker has not confirmed yet, oldest first (JSON).
    pub fn outbox(&self) -> rusqlite::Result<Vec<String>> {
        let mut q = self
            .conn
            .prepare("SELECT ack FROM mqtt_outbox ORDER BY rowid")?;
        let rows = q.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    }

    /// Export excursions that started in `[from, to)`, oldest first.
    pub fn excursions(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> rusqlite::Result<Vec<crate::compliance::Excursion>> {
        let mut q = self.conn.prepare(
            "SELECT body FROM excursions WHERE start_ms >= ?1 AND start_ms < ?2 ORDER BY start_ms",
        )?;
        let rows = q.query_map(
            params![from.timestamp_millis(), to.timestamp_millis()],
            |r| r.get::<_, String>(0),
        )?;
        let mut out = Vec::new();
        for body in rows {
            match serde_json::from_str(&body?) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!("an excursion in the store is not readable: {e}"),
            }
        }
        Ok(out)
    }

    /// Every demand-response event ever stored: ids are unique for ever, so the book needs
    /// them all to refuse a repeat, and the ones not over yet to enforce them.
    pub fn dr_events(&self) -> rusqlite::Result<Vec<StoredEvent>> {
        let mut q = self
            .conn
            .prepare("SELECT id, event, state FROM dr_events ORDER BY rowid")?;
        let rows = q.query_map([], |r| {
            Ok(StoredEvent {
                id: r.get(0)?,
                json: r.get(1)?,
                state: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// Each unit's own settings, as kept at takeover, by device id.
    pub fn originals(&self) -> rusqlite::Result<HashMap<String, Vec<(u16, u16)>>> {
        let mut q = self
            .conn
            .prepare("SELECT device, register, value FROM originals ORDER BY device, register")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u16>(1)?,
                r.get::<_, u16>(2)?,
            ))
        })?;
        let mut out: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
        for row in rows {
            let (device, register, value) = row?;
            out.entry(device).or_default().push((register, value));
        }
        Ok(out)
    }

    /// The state of one stored event, if any.
    pub fn dr_event_state(&self, id: &str) -> rusqlite::Result<Option<String>> {
        let mut q = self
            .conn
            .prepare("SELECT state FROM dr_events WHERE id = ?1")?;
        let mut rows = q.query_map(params![id], |r| r.get(0))?;
        rows.next().transpose()
    }
}

fn write_sample(conn: &Connection, minute: i64, v: [f64; 3]) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO samples (minute, load_w, pv_w, grid_w) VALUES (?1, ?2, ?3, ?4)",
        params![minute, v[0], v[1], v[2]],
    )?;
    Ok(())
}

fn write_originals(
    conn: &Connection,
    device: &str,
    values: Option<&[(u16, u16)]>,
) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute("DELETE FROM originals WHERE device = ?1", params![device])?;
    for (register, value) in values.unwrap_or_default() {
        tx.execute(
            "INSERT INTO originals (device, register, value) VALUES (?1, ?2, ?3)",
            params![device, register, value],
        )?;
    }
    tx.commit()
}

fn write_weather(conn: &Connection, fetched: i64, body: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO weather (id, fetched, body) VALUES (1, ?1, ?2)",
        params![fetched, body],
    )?;
    Ok(())
}

fn write_excursion(conn: &Connection, e: &crate::compliance::Excursion) -> rusqlite::Result<()> {
    let body =
        serde_json::to_string(e).map_err(|x| rusqlite::Error::ToSqlConversionFailure(x.into()))?;
    conn.execute(
        "INSERT INTO excursions (start_ms, body) VALUES (?1, ?2)",
        params![e.start.timestamp_millis(), body],
    )?;
    Ok(())
}

fn write_outbox(conn: &Connection, key: &str, ack: Option<&str>) -> rusqlite::Result<()> {
    match ack {
        Some(json) => conn.execute(
            "INSERT OR REPLACE INTO mqtt_outbox (key, ack) VALUES (?1, ?2)",
            params![key, json],
        )?,
        None => conn.execute("DELETE FROM mqtt_outbox WHERE key = ?1", params![key])?,
    };
    Ok(())
}

fn write_dr_event(conn: &Connection, e: &StoredEvent) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO dr_events (id, event, state) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET event = excluded.event, state = excluded.state",
        params![e.id, e.json, e.state],
    )?;
    Ok(())
}
