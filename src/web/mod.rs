//! What the EMS serves over HTTP: the live site page at `/` (`page.html`, embedded), the API
//! (status, plan, DR events, excursions, the wiring check, health), the status contract it
//! publishes, and the Prometheus metrics.

pub mod api;
pub mod metrics;
pub mod status;
