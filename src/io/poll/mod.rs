//! Device pollers: read a device's blocks through its link, decode them with its driver, and
//! keep its freshness. A timeout, exception or implausible frame marks the device unhealthy
//! with the reason; its last reading is kept for display only, never as if fresh. Times are
//! readings of the injected monotonic clock.
//!
//! One file per kind of device: `inverter` (SAJ and SunSpec units), `meter` (Chint and
//! SunSpec meters); what every poller shares — freshness, back-off, the frozen-meter watch —
//! is here.

mod inverter;
mod meter;

use std::time::Duration;

use crate::drivers::MeterReading;
use crate::io::link::LinkError;
use crate::io::IoObserver;

pub use inverter::{InverterPoller, SunSpecTarget, SunSpecUnit};
pub use meter::MeterPoller;

/// Consecutive failures before a device is polled less often.
const BACKOFF_AFTER: u32 = 3;
/// Longest pause between attempts at a failing device.
const MAX_DEVICE_BACKOFF: Duration = Duration::from_secs(5);
/// Energy counters and identity change slowly; read them this often.
pub(super) const SLOW_PERIOD: Duration = Duration::from_secs(60);
/// On a lean (RS485) link, the inverter's full real-time block — state, faults, SOC,
/// per-phase detail — is read this often; its power totals every cycle.
pub(super) const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// A SunSpec unit's ratings and control model (read back) are read this often.
pub(super) const SUNSPEC_SLOW_PERIOD: Duration = Duration::from_secs(60);

/// Why a poll got no reading.
#[derive(Debug, thiserror::Error)]
pub(super) enum PollError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("bad data: {0}")]
    Decode(#[from] crate::drivers::DecodeError),
    #[error("SunSpec discovery: {0}")]
    Discovery(String),
}

impl From<crate::io::discovery::DiscoveryError> for PollError {
    fn from(e: crate::io::discovery::DiscoveryError) -> PollError {
        match e {
            crate::io::discovery::DiscoveryError::Link(l) => PollError::Link(l),
            other => PollError::Discovery(other.to_string()),
        }
    }
}

impl PollError {
    /// Bounded name of the reason, for status.
    fn kind(&self) -> &'static str {
        match self {
            PollError::Link(e) => e.kind(),
            PollError::Decode(_) => "decode",
            PollError::Discovery(_) => "discovery",
        }
    }
}

/// Answers that arrived but made no sense count as decode errors (the link counts the rest).
pub(super) fn count_decode_error<T>(
    result: &Result<T, PollError>,
    observer: Option<&dyn IoObserver>,
    link: &str,
    device: &str,
) {
    if let (Err(PollError::Decode(_)), Some(m)) = (result, observer) {
        m.decode_error(link, device);
    }
}

/// When a device last answered well, and why it did not since.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    pub last_ok: Option<Duration>,
    pub last_error: Option<String>,
    /// The kind of the last failure: `timeout`, `exception`, `connect`, `transport`, `decode`.
    pub last_error_kind: Option<&'static str>,
    pub failures: u32,
    retry_at: Option<Duration>,
}

impl Freshness {
    pub fn due(&self, now: Duration) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    /// Keep a good reading, or record why there is none. True when the poll succeeded.
    pub(super) fn settle<T>(
        &mut self,
        slot: &mut Option<T>,
        result: Result<T, PollError>,
        now: Duration,
        cycle: Duration,
        device: &str,
    ) -> bool {
        match result {
            Ok(reading) => {
                *slot = Some(reading);
                self.ok(now);
                true
            }
            Err(why) => {
                tracing::debug!(device, "poll failed: {why}");
                self.last_error_kind = Some(why.kind());
                self.fail(now, why.to_string(), cycle);
                false
            }
        }
    }

    fn ok(&mut self, now: Duration) {
        self.last_ok = Some(now);
        self.last_error = None;
        self.last_error_kind = None;
        self.failures = 0;
        self.retry_at = None;
    }

    fn fail(&mut self, now: Duration, why: String, cycle: Duration) {
        self.failures += 1;
        self.last_error = Some(why);
        if self.failures >= BACKOFF_AFTER {
            let factor = 1u32 << (self.failures - BACKOFF_AFTER).min(6);
            self.retry_at = Some(now + (cycle * factor).min(MAX_DEVICE_BACKOFF));
        }
    }

    pub fn age(&self, now: Duration) -> Option<Duration> {
        self.last_ok.map(|t| now.saturating_sub(t))
    }

    pub fn is_fresh(&self, now: Duration, stale_after: Duration) -> bool {
        self.age(now).is_some_and(|a| a <= stale_after)
    }

    /// Why the device is not fresh: the last failure's kind, or `never_read`.
    pub fn stale_reason(&self) -> &'static str {
        match (self.last_error_kind, self.last_ok) {
            (Some(kind), _) => kind,
            (None, None) => "never_read",
            (None, Some(_)) => "old",
        }
    }
}

/// A meter that keeps serving the same values — a gateway repeating its cache — while the
/// fleet's measured output moves underneath it. Grid power is load minus generation, so a
/// change in generation that never shows at the meter means the meter is not measuring.
#[derive(Debug, Clone, Default)]
pub struct FrozenWatch {
    last: Option<MeterReading>,
    /// When the current run of identical readings began.
    since: Option<Duration>,
    /// The fleet's AC output, lowest and highest, from the poll before the run began to now.
    fleet_lo_w: f64,
    fleet_hi_w: f64,
    /// The fleet's output at the last poll.
    fleet_last_w: Option<f64>,
}

impl FrozenWatch {
    /// After a poll that returned `reading` at `now`, with the fleet's measured AC output.
    pub fn observe(&mut self, now: Duration, reading: &MeterReading, fleet_ac_w: f64) {
        let before_w = self.fleet_last_w.replace(fleet_ac_w).unwrap_or(fleet_ac_w);
        if self.last.as_ref() == Some(reading) {
            self.fleet_lo_w = self.fleet_lo_w.min(fleet_ac_w);
            self.fleet_hi_w = self.fleet_hi_w.max(fleet_ac_w);
            return;
        }
        // A gateway may freeze in the same poll as the fleet steps (its cache refreshed
        // once more): the step happened since the last poll, so it counts for this run.
        self.last = Some(reading.clone());
        self.since = Some(now);
        self.fleet_lo_w = fleet_ac_w.min(before_w);
        self.fleet_hi_w = fleet_ac_w.max(before_w);
    }

    /// Identical readings for at least `after` while the fleet's output moved by
    /// `min_change_w` or more.
    pub fn frozen(&self, now: Duration, after: Duration, min_change_w: f64) -> bool {
        self.since.is_some_and(|t| now.saturating_sub(t) >= after)
            && self.fleet_hi_w - self.fleet_lo_w >= min_change_w
    }

    /// How long the readings have been identical.
    pub fn unchanged_for(&self, now: Duration) -> Duration {
        self.since.map_or(Duration::ZERO, |t| now.saturating_sub(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(power_w: f64) -> MeterReading {
        MeterReading {
            power_w,
            phases: Vec::new(),
            frequency_hz: Some(50.0),
        }
    }

    const AFTER: Duration = Duration::from_secs(10);
    const MIN_W: f64 = 2000.0;

    fn watch(steps: &[(u64, f64, f64)]) -> (FrozenWatch, Duration) {
        let mut w = FrozenWatch::default();
        let mut now = Duration::ZERO;
        for &(t, meter_w, fleet_w) in steps {
            now = Duration::from_secs(t);
            w.observe(now, &reading(meter_w), fleet_w);
        }
        (w, now)
    }

    #[test]
    fn a_meter_that_moves_is_never_frozen() {
        let steps: Vec<_> = (0..30)
            .map(|t| (t, 100.0 + t as f64, if t < 15 { 30e3 } else { -4e3 }))
            .collect();
        let (w, now) = watch(&steps);
        assert!(!w.frozen(now, AFTER, MIN_W));
    }

    #[test]
    fn a_steady_site_with_a_repeating_meter_is_not_called_frozen() {
        // Nothing moved: the repeated value may be true (and is harmless if not).
        let steps: Vec<_> = (0..30).map(|t| (t, 100.0, 30e3)).collect();
        let (w, now) = watch(&steps);
        assert!(!w.frozen(now, AFTER, MIN_W));
    }

    #[test]
    fn repeated_values_while_the_fleet_moves_are_frozen_after_the_delay() {
        let mut steps: Vec<_> = (0..5).map(|t| (t, 100.0 + t as f64, 30e3)).collect();
        steps.extend((5..20).map(|t| (t, 500.0, if t < 8 { 30e3 } else { -4e3 })));
        let (w, _) = watch(&steps);
        assert!(!w.frozen(Duration::from_secs(14), AFTER, MIN_W));
        assert!(w.frozen(Duration::from_secs(15), AFTER, MIN_W));
    }

    #[test]
    fn a_fleet_step_in_the_poll_where_the_values_freeze_counts() {
        // The first repeated value arrives with the fleet already stepped down.
        let mut steps: Vec<_> = (0..5).map(|t| (t, 100.0 + t as f64, 30e3)).collect();
        steps.extend((5..16).map(|t| (t, 500.0, -4e3)));
        let (w, now) = watch(&steps);
        assert!(w.frozen(now, AFTER, MIN_W));
    }
}
