//! site-ems: a site energy manager for fleets of SAJ hybrid inverters.
//!
//! The crate is split into a functional core (config, drivers' decoding, site physics of the
//! simulator) and an I/O shell (Modbus links, the poller, the HTTP API).

pub mod config;
pub mod drivers;
