//! What the EMS serves over HTTP: the API (status, plan, DR events, health), the status
//! contract it publishes, and the Prometheus metrics.

pub mod api;
pub mod metrics;
pub mod status;
