//! site-ems: a site energy manager for fleets of SAJ hybrid inverters.
//!
//! The crate is split into a functional core (config, drivers' decoding, site physics of the
//! simulator) and an I/O shell (Modbus links, the poller, the HTTP API).

pub mod actuator;
pub mod api;
pub mod clock;
pub mod config;
pub mod contacts;
pub mod control;
pub mod dr;
pub mod dr_book;
pub mod drivers;
pub mod link;
pub mod metrics;
pub mod mqtt;
pub mod planner;
pub mod poll;
pub mod run;
pub mod sim;
pub mod solar;
pub mod status;
pub mod store;
