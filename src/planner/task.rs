//! The planner off the guard loop: a task that takes plan requests, reads the inputs (CSV
//! files, the store's history) and solves on a blocking thread, and hands each outcome back
//! through a watch channel. One solve at a time; requests that arrive meanwhile are merged,
//! so only the newest is solved next.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

use super::Plan;
use crate::config::SiteConfig;
use crate::dr::{DrEvent, LevelLimits};
use crate::store::writer::Writer;
use crate::store::Store;

/// What the loop asks for: a plan from `time`, starting at the measured SOC, with the
/// demand-response events then in the book.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Numbers requests, so the loop knows which one an outcome answers.
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub soc_pct: Vec<f64>,
    pub dr_events: Arc<[DrEvent]>,
}

#[derive(Debug, Clone)]
pub struct PlanOutcome {
    pub seq: u64,
    pub result: Result<Arc<Plan>, String>,
}

/// The loop's end of the planner task.
pub struct PlannerHandle {
    requests: mpsc::UnboundedSender<PlanRequest>,
    pub outcomes: watch::Receiver<Option<PlanOutcome>>,
}

impl PlannerHandle {
    /// Ask for a plan; never waits.
    pub fn request(&self, r: PlanRequest) {
        if self.requests.send(r).is_err() {
            tracing::error!("the planner task has stopped");
        }
    }
}

/// Start the planner task for `config` (which must have a `planner:` section). `delay` is
/// added to every solve: tests use it to stand for a slow solve.
pub fn spawn(config: SiteConfig, delay: Duration, writer: Option<Writer>) -> PlannerHandle {
    let (requests, mut rx) = mpsc::unbounded_channel::<PlanRequest>();
    let (tx, outcomes) = watch::channel(None);
    let config = Arc::new(config);
    // Read at start, with the EMS's other start-up reads, not inside the task.
    let mut weather = Weather::from_store(&config, writer);
    tokio::spawn(async move {
        while let Some(mut request) = rx.recv().await {
            // Only the newest request matters.
            while let Ok(newer) = rx.try_recv() {
                request = newer;
            }
            let seq = request.seq;
            let config = config.clone();
            weather.refresh(&config, request.time).await;
            let forecast = weather.latest.clone();
            let solved = tokio::task::spawn_blocking(move || {
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                plan(&config, &request, forecast)
            })
            .await;
            let result = match solved {
                Ok(r) => r.map(Arc::new),
                Err(e) => Err(format!("the planner thread failed: {e}")),
            };
            if tx.send(Some(PlanOutcome { seq, result })).is_err() {
                return;
            }
        }
    });
    PlannerHandle { requests, outcomes }
}

/// The weather forecast as the planner task keeps it: fetched every `refresh_min`, the last
/// good one kept until a newer one comes (the inputs drop it once stale).
#[derive(Default)]
struct Weather {
    latest: Option<Result<(String, DateTime<Utc>), String>>,
    fetched: Option<std::time::Instant>,
    /// Where each forecast fetched is kept for the next start.
    store: Option<Writer>,
}

impl Weather {
    /// The forecast an earlier run kept, if any (it is still only used while fresh).
    fn from_store(config: &SiteConfig, store: Option<Writer>) -> Weather {
        let kept = config.store.as_ref().and_then(|s| {
            Store::open(&PathBuf::from(&s.path))
                .and_then(|st| st.weather())
                .map_err(|e| tracing::warn!("no stored weather forecast: {e}"))
                .ok()
                .flatten()
        });
        Weather {
            latest: kept.map(Ok),
            fetched: None,
            store,
        }
    }

    async fn refresh(&mut self, config: &SiteConfig, now: DateTime<Utc>) {
        let Some(w) = config
            .planner
            .as_ref()
            .and_then(|p| p.pv_forecast.weather.as_ref())
        else {
            return;
        };
        let due = self
            .fetched
            .is_none_or(|t| t.elapsed().as_secs_f64() >= w.refresh_min * 60.0);
        if !due {
            return;
        }
        self.fetched = Some(std::time::Instant::now());
        match super::weather::fetch(&w.url).await {
            Ok(body) => {
                if let Some(w) = &self.store {
                    w.weather(now.timestamp(), body.clone());
                }
                self.latest = Some(Ok((body, now)));
            }
            Err(e) => {
                tracing::warn!("weather forecast not fetched: {e}");
                if !matches!(self.latest, Some(Ok(_))) {
                    self.latest = Some(Err(e));
                }
            }
        }
    }
}

/// One plan, inputs read here (files, history), off the loop.
fn plan(
    config: &SiteConfig,
    r: &PlanRequest,
    weather: Option<Result<(String, DateTime<Utc>), String>>,
) -> Result<Plan, String> {
    let p = config
        .planner
        .as_ref()
        .ok_or("the site file has no planner")?;
    let store = match &config.store {
        Some(s) => Some(
            Store::open(&PathBuf::from(&s.path))
                .map_err(|e| format!("cannot read the store {}: {e}", s.path))?,
        ),
        None => None,
    };
    let mut inputs = super::inputs::from_config(
        config,
        p,
        r.time,
        &r.soc_pct,
        &super::inputs::Overrides {
            weather,
            ..Default::default()
        },
        store.as_ref(),
    )?;
    inputs.dr_limits_w = dr_step_limits(config, &r.dr_events, &inputs);
    super::solve(&inputs).map_err(|e| e.to_string())
}

/// Export and import limits that demand-response events put on each planning step.
pub fn dr_step_limits(
    config: &SiteConfig,
    events: &[DrEvent],
    inputs: &super::PlanInputs,
) -> Vec<(Option<f64>, Option<f64>)> {
    if events.is_empty() {
        return Vec::new();
    }
    let fleet_rated_w: f64 = config.inverters.iter().map(|i| i.rated_power_w).sum();
    let levels: [LevelLimits; 4] = config.dr_settings().openadr_levels;
    (0..inputs.steps())
        .map(|k| {
            let t = inputs.start + chrono::Duration::seconds((k as f64 * inputs.step_s) as i64);
            let c = crate::dr::resolve(events, t, fleet_rated_w, &levels);
            (c.export_limit_w, c.import_limit_w)
        })
        .collect()
}
