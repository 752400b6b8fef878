//! The export-excursion log at run time: each cycle's grid reading against the limits in
//! force (the pure [`crate::compliance`] watch), and every excursion that ends kept in the
//! store, counted in the metrics and served by the API.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::compliance::{over_limit, Excursion, ExcursionWatch, LimitInForce};
use crate::config::SiteConfig;
use crate::control::{Constraints, GridReading, Source};
use crate::store::writer::Writer;
use crate::store::Store;
use crate::web::metrics::Metrics;

/// This run's excursions, for the API on a site without a store (with one, the store is
/// asked, so earlier runs count too). Bounded: the oldest go first.
const KEPT_IN_MEMORY: usize = 10_000;

/// Where the API finds excursions.
#[derive(Clone, Default)]
pub struct ExcursionLog {
    recent: Arc<Mutex<Vec<Excursion>>>,
    store: Option<std::path::PathBuf>,
}

impl ExcursionLog {
    pub fn new(config: &SiteConfig) -> ExcursionLog {
        ExcursionLog {
            recent: Arc::default(),
            store: config.store.as_ref().map(|s| s.path.clone().into()),
        }
    }

    fn push(&self, e: Excursion) {
        let mut v = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= KEPT_IN_MEMORY {
            v.remove(0);
        }
        v.push(e);
    }

    /// Excursions that started in `[from, to)`, oldest first.
    pub async fn between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Excursion>, String> {
        match &self.store {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    Store::open(&path)
                        .and_then(|s| s.excursions(from, to))
                        .map_err(|e| format!("the store cannot be read: {e}"))
                })
                .await
                .map_err(|e| e.to_string())?
            }
            None => Ok(self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|e| e.start >= from && e.start < to)
                .cloned()
                .collect()),
        }
    }
}

/// The watch and where an ended excursion goes.
pub struct Compliance {
    watch: ExcursionWatch,
    log: ExcursionLog,
}

impl Compliance {
    pub fn new(log: ExcursionLog) -> Compliance {
        Compliance {
            watch: ExcursionWatch::default(),
            log,
        }
    }

    /// One cycle at `time`: the grid reading the controller used (`None`: stale), the limits
    /// in force, and whether fail-safe acted.
    pub fn cycle(
        &mut self,
        time: DateTime<Utc>,
        grid: Option<&GridReading>,
        constraints: &Constraints,
        fail_safe: bool,
        out: (&Metrics, Option<&Writer>),
    ) {
        let limits: Vec<LimitInForce> = constraints
            .export
            .iter()
            .map(|cap| LimitInForce {
                limit: cap.limit,
                dr: cap.source == Source::DemandResponse,
            })
            .collect();
        let over = grid.and_then(|g| over_limit(&g.phases, &limits));
        if let Some(e) = self.watch.observe(time, over, grid.is_some(), fail_safe) {
            self.record(e, out);
        }
    }

    /// Close an excursion under way (the EMS stops).
    pub fn finish(&mut self, time: DateTime<Utc>, out: (&Metrics, Option<&Writer>)) {
        if let Some(e) = self.watch.finish(time) {
            self.record(e, out);
        }
    }

    fn record(&self, e: Excursion, (metrics, writer): (&Metrics, Option<&Writer>)) {
        tracing::warn!(
            start = %e.start,
            duration_s = e.duration_s,
            peak = e.peak,
            limit = e.limit,
            unit = e.unit.unit(),
            constraint = %e.constraint,
            "export excursion"
        );
        metrics.excursion(e.duration_s);
        if let Some(w) = writer {
            w.excursion(e.clone());
        }
        self.log.push(e);
    }
}
