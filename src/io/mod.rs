//! The shell around devices: Modbus links (TCP endpoints and RS485 buses), polling with
//! freshness, actuation (write order, write-on-change, hand-back) and the DR contact module.
//! Everything here does I/O; what it decodes and decides is in `drivers` and `control`.

pub mod actuation;
pub mod contacts;
pub mod discovery;
pub mod link;
pub mod poll;

use std::time::Duration;

use link::LinkError;

/// Who hears about every Modbus transaction and every answer that could not be decoded
/// (the metrics, in the EMS). The links and pollers report here without knowing who listens,
/// so the device I/O does not depend on the web layer.
pub trait IoObserver: Send + Sync {
    fn request(&self, link: &str, device: &str, result: Result<(), &LinkError>, took: Duration);
    fn decode_error(&self, link: &str, device: &str);
    /// A register write to a unit's settings, sent (`ok`) or failed.
    fn write(&self, device: &str, register: u16, ok: bool);
}
