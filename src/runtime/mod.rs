//! The EMS at run time: the guard loop and everything it hands work to.
//!
//! Each cycle of the guard loop ([`ems::Ems::cycle`]):
//! 1. reads every device, links in parallel ([`devices`]);
//! 2. moves demand-response events through their states and resolves them ([`demand`]);
//! 3. takes the newest plan and asks for the next when due ([`planning`]);
//! 4. decides with the pure `control::step` and writes the setpoints;
//! 5. publishes status, metrics, telemetry and a history value.
//!
//! Beside it, never waited for: the planner's task (solves on a blocking thread), the store's
//! writer thread, the MQTT link and the HTTP API.

pub mod commissioning;
pub mod compliance;
pub mod demand;
pub mod devices;
pub mod ems;
pub mod planning;
pub mod supervision;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use ems::{Ems, EmsOptions};

use crate::clock::Clock;
use crate::config::SiteConfig;
use crate::web::api;

/// Run the EMS and its API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: SiteConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(config, listener, clock, EmsOptions::default(), shutdown).await
}

/// As [`serve`], with options that are not in the site file.
pub async fn serve_with(
    config: SiteConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    options: EmsOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (ems, state) = Ems::with_options(config, clock, options);
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
