//! Sending setpoints to the units, one actuator per unit, of the kind its driver needs. Each
//! decides what goes on the wire and in which order, and what the unit is left with when the
//! EMS stops; the drivers encode and clamp.
//!
//! Common discipline — settings live in memory of limited write endurance:
//! - **safety first**: a falling output cap goes out first and at once;
//! - **only what matters**: a value is written when it changes, and a change that is not a
//!   safety decrease waits for `min_interval` unless the decision is urgent;
//! - **a safety net without the EMS**: SAJ units hold their own export limit; SunSpec units
//!   get revert timers (see [`sunspec`]).

pub mod saj;
pub mod sunspec;

use std::sync::Arc;
use std::time::Duration;

use crate::drivers::Command;
use crate::io::link::{Link, LinkError};
use crate::io::poll::SunSpecTarget;
use crate::io::IoObserver;

pub use saj::{Alarm, SajActuator, CONFIRM_ATTEMPTS, READBACK_EVERY};
pub use sunspec::SunSpecActuator;

/// What a unit is told this cycle: the setpoint, and the cap it must fall back to by itself
/// if the EMS goes quiet (from [`crate::control::stop_caps`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setpoint {
    pub command: Command,
    pub safe_cap_w: f64,
}

/// One unit's actuator.
pub enum Actuator {
    Saj(SajActuator),
    SunSpec(SunSpecActuator),
}

impl Actuator {
    /// The actuator for a unit of `model` on `link`.
    pub fn for_model(
        model: crate::config::InverterModel,
        device: Arc<str>,
        unit: u8,
        rated_w: f64,
        link: Link,
        revert: Duration,
    ) -> Actuator {
        if model.is_saj() {
            Actuator::Saj(SajActuator::new(device, unit, rated_w, link))
        } else {
            Actuator::SunSpec(SunSpecActuator::new(device, unit, link, revert))
        }
    }

    pub fn with_observer(self, observer: Arc<dyn IoObserver>) -> Self {
        match self {
            Actuator::Saj(a) => Actuator::Saj(a.with_observer(observer)),
            Actuator::SunSpec(a) => Actuator::SunSpec(a.with_observer(observer)),
        }
    }

    pub fn with_min_interval(self, min_interval: Duration) -> Self {
        match self {
            Actuator::Saj(a) => Actuator::Saj(a.with_min_interval(min_interval)),
            Actuator::SunSpec(a) => Actuator::SunSpec(a.with_min_interval(min_interval)),
        }
    }

    /// An SAJ unit's own settings kept from an earlier run (SunSpec units keep nothing: their
    /// controls revert by themselves).
    pub fn with_original(self, original: Option<Vec<(u16, u16)>>) -> Self {
        match self {
            Actuator::Saj(a) => Actuator::Saj(a.with_original(original)),
            other => other,
        }
    }

    pub fn device(&self) -> &str {
        match self {
            Actuator::Saj(a) => a.device(),
            Actuator::SunSpec(a) => a.device(),
        }
    }

    /// What the unit reported as its running mode (SAJ `0x4022`), read at `read_at`.
    pub fn confirm_mode(&mut self, reported: u16, read_at: Duration) {
        if let Actuator::Saj(a) = self {
            a.confirm_mode(reported, read_at);
        }
    }

    /// Send `sp` at `now`; `target`: a SunSpec unit's discovered models (`None` until found).
    pub async fn apply(
        &mut self,
        sp: &Setpoint,
        target: Option<&SunSpecTarget>,
        now: Duration,
        urgent: bool,
    ) -> Result<usize, LinkError> {
        match self {
            Actuator::Saj(a) => a.apply(&sp.command, now, urgent).await,
            Actuator::SunSpec(a) => a.apply(sp, target, now, urgent).await,
        }
    }

    pub fn take_new_original(&mut self) -> Option<Vec<(u16, u16)>> {
        match self {
            Actuator::Saj(a) => a.take_new_original(),
            Actuator::SunSpec(_) => None,
        }
    }

    pub fn alarm(&self) -> Option<&'static str> {
        match self {
            Actuator::Saj(a) => a.alarm.map(|x| x.label()),
            Actuator::SunSpec(a) => a.alarm(),
        }
    }

    /// Leave the unit safe without the EMS: output at most `cap_w`, battery idle, held.
    pub async fn stop_safe(
        &mut self,
        cap_w: f64,
        target: Option<&SunSpecTarget>,
    ) -> Result<(), LinkError> {
        match self {
            Actuator::Saj(a) => a.stop_safe(cap_w).await,
            Actuator::SunSpec(a) => a.stop_safe(cap_w, target).await,
        }
    }

    /// Give the unit back its own behaviour, its output held at `cap_w` or lower when the
    /// site has an export limit. Returns whether there was anything to give back.
    pub async fn release(
        &mut self,
        cap_w: Option<f64>,
        target: Option<&SunSpecTarget>,
    ) -> Result<bool, LinkError> {
        match self {
            Actuator::Saj(a) => a.release(cap_w).await,
            Actuator::SunSpec(a) => a.release(cap_w, target).await,
        }
    }
}
