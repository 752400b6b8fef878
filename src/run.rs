//! The EMS runtime: links and pollers built from the site file, one cycle per
//! `control.cycle_ms` (poll every device in parallel across links, then publish), and the
//! HTTP API beside it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::api::{self, AppState, Published};
use crate::clock::Clock;
use crate::config::SiteConfig;
use crate::link::Link;
use crate::metrics::Metrics;
use crate::poll::{InverterPoller, MeterPoller};
use crate::status;

pub struct Ems {
    config: SiteConfig,
    meters: Vec<MeterPoller>,
    inverters: Vec<InverterPoller>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    publish: watch::Sender<Option<Published>>,
    cycle: u64,
}

impl Ems {
    /// Build links and pollers for `config`. Must run inside a tokio runtime.
    pub fn new(config: SiteConfig, clock: Arc<dyn Clock>) -> (Ems, AppState) {
        let metrics = Arc::new(Metrics::new(&config.site.name));
        let links: HashMap<&str, Link> = config
            .links
            .iter()
            .map(|l| (l.name.as_str(), Link::spawn(l, Some(metrics.clone()))))
            .collect();
        // Validation guarantees every device names a defined link.
        let link_of = |name: &str| links.get(name).cloned();
        let meters = config
            .meters
            .iter()
            .filter_map(|m| Some(MeterPoller::new(m.clone(), link_of(&m.link)?)))
            .collect();
        let inverters = config
            .inverters
            .iter()
            .filter_map(|i| Some(InverterPoller::new(i.clone(), link_of(&i.link)?)))
            .collect();
        let (publish, rx) = watch::channel(None);
        let cycle = Duration::from_millis(config.control.cycle_ms);
        let state = AppState {
            status: rx,
            metrics: metrics.clone(),
            max_silence: (cycle * 5).max(Duration::from_secs(5)),
        };
        (
            Ems {
                config,
                meters,
                inverters,
                metrics,
                clock,
                publish,
                cycle: 0,
            },
            state,
        )
    }

    /// One cycle: poll every device (links run in parallel), then publish the status.
    pub async fn cycle(&mut self) {
        let started = Instant::now();
        let period = Duration::from_millis(self.config.control.cycle_ms);
        let t0 = self.clock.monotonic();
        let meters = join_all(self.meters.iter_mut().map(|m| m.poll(t0, period)));
        let inverters = join_all(self.inverters.iter_mut().map(|i| i.poll(t0, period)));
        tokio::join!(meters, inverters);

        let now = self.clock.monotonic();
        self.cycle += 1;
        let status = status::build(
            &self.config,
            &self.meters,
            &self.inverters,
            now,
            self.clock.now(),
            self.cycle,
        );
        self.metrics.observe(&status);
        self.metrics
            .cycle_duration
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
        self.publish.send_replace(Some(Published {
            status: Arc::new(status),
            at: Instant::now(),
        }));
    }

    /// Cycle until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.control.cycle_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => self.cycle().await,
            }
        }
    }
}

/// Run the EMS and its API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: SiteConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (ems, state) = Ems::new(config, clock);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut loop_stop = stop_rx;
    let control = ems.run(async move {
        let _ = loop_stop.wait_for(|s| *s).await;
    });
    tokio::pin!(control);
    tokio::select! {
        _ = shutdown => {}
        _ = &mut control => {}
    }
    let _ = stop_tx.send(true);
    control.await;
    match api.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    }
}
