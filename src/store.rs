//! The embedded store: a SQLite file with the site's history — one row a minute of load,
//! PV and grid power — from which the planner forecasts load (same weekday, same time, over
//! the last weeks).

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

pub struct Store {
    conn: Connection,
    /// Minute being accumulated: (minute start, sums, count).
    pending: Option<(i64, [f64; 3], u32)>,
}

/// One minute of the site, averaged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub minute: DateTime<Utc>,
    pub load_w: f64,
    pub pv_w: f64,
    pub grid_w: f64,
}

impl Store {
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS samples (
                 minute INTEGER PRIMARY KEY,  -- unix seconds, start of the minute (UTC)
                 load_w REAL NOT NULL,
                 pv_w REAL NOT NULL,
                 grid_w REAL NOT NULL
             );",
        )?;
        Ok(Store {
            conn,
            pending: None,
        })
    }

    /// Add one cycle's values; a minute's average is written when the next minute starts.
    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        load_w: f64,
        pv_w: f64,
        grid_w: f64,
    ) -> rusqlite::Result<()> {
        let minute = at.timestamp() - at.timestamp().rem_euclid(60);
        match &mut self.pending {
            Some((m, sums, n)) if *m == minute => {
                sums[0] += load_w;
                sums[1] += pv_w;
                sums[2] += grid_w;
                *n += 1;
                Ok(())
            }
            _ => {
                let done = self.pending.replace((minute, [load_w, pv_w, grid_w], 1));
                match done {
                    Some((m, sums, n)) => self.write(m, sums.map(|s| s / f64::from(n))),
                    None => Ok(()),
                }
            }
        }
    }

    fn write(&self, minute: i64, v: [f64; 3]) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO samples (minute, load_w, pv_w, grid_w) VALUES (?1, ?2, ?3, ?4)",
            params![minute, v[0], v[1], v[2]],
        )?;
        Ok(())
    }

    /// Write a sample directly (imports, tests).
    pub fn insert(&self, s: Sample) -> rusqlite::Result<()> {
        self.write(s.minute.timestamp(), [s.load_w, s.pv_w, s.grid_w])
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
}
