//! site-ems: a site energy manager for fleets of hybrid inverters.
//!
//! A cycle in five lines: `io` reads every device through its link; `drivers` decode the
//! registers into readings in our units and signs; `runtime` gathers them with the demand
//! response in force (`dr`) and the plan in force (`planner`) into a snapshot; the pure
//! `control::step` turns it into setpoints; `io` writes them, and `web` publishes status and
//! metrics. The planner, the store's writer and the aggregator link run beside the loop and
//! are never waited for.
//!
//! Devices are reached through drivers (`drivers::saj`, `drivers::chint`,
//! `drivers::sunspec`): polling, actuation and status pick a driver by the model the site
//! file names, and never a vendor's registers directly.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod calendar;
pub mod clock;
pub mod commissioning;
pub mod compliance;
pub mod config;
pub mod control;
pub mod dr;
pub mod drivers;
pub mod io;
pub mod planner;
pub mod runtime;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sky;
pub mod solar;
pub mod store;
pub mod web;

/// Make TLS usable: rustls needs one crypto provider for the process, and the MQTT client
/// and the HTTP client each compile in a different one, so it cannot pick by itself. Called
/// before any TLS connection is set up; later calls do nothing.
pub fn tls_ready() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
