//! Device pollers: read a device's blocks through its link, decode them with its driver, and
//! keep its freshness. A timeout, exception or implausible frame marks the device unhealthy
//! with the reason; its last reading is kept for display only, never as if fresh. Times are
//! readings of the injected monotonic clock.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{InverterConfig, MeterConfig};
use crate::drivers::chint::{self, decode_energy, decode_instant, role_sign};
use crate::drivers::saj::{self, Identity, Nameplate};
use crate::drivers::{InverterReading, MeterEnergy, MeterReading, ReadBlock, Table};
use crate::io::link::{Link, LinkError};
use crate::io::IoObserver;

/// Consecutive failures before a device is polled less often.
const BACKOFF_AFTER: u32 = 3;
/// Longest pause between attempts at a failing device.
const MAX_DEVICE_BACKOFF: Duration = Duration::from_secs(5);
/// Energy counters and identity change slowly; read them this often.
const SLOW_PERIOD: Duration = Duration::from_secs(60);
/// On a lean (RS485) link, the inverter's full real-time block — state, faults, SOC,
/// per-phase detail — is read this often; its power totals every cycle.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Why a poll got no reading.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("bad data: {0}")]
    Decode(#[from] crate::drivers::DecodeError),
}

impl PollError {
    /// Bounded name of the reason, for status.
    fn kind(&self) -> &'static str {
        match self {
            PollError::Link(e) => e.kind(),
            PollError::Decode(_) => "decode",
        }
    }
}

/// Answers that arrived but made no sense count as decode errors (the link counts the rest).
fn count_decode_error<T>(
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
    fn settle<T>(
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

pub struct InverterPoller {
    pub cfg: InverterConfig,
    pub device: Arc<str>,
    plate: Nameplate,
    link: Link,
    pub reading: Option<InverterReading>,
    pub identity: Option<Identity>,
    identity_read_at: Option<Duration>,
    /// Read only the power totals each cycle (RS485, where wire time is precious).
    lean: bool,
    status_read_at: Option<Duration>,
    observer: Option<Arc<dyn IoObserver>>,
    pub fresh: Freshness,
}

impl InverterPoller {
    pub fn new(cfg: InverterConfig, link: Link, lean: bool) -> InverterPoller {
        let plate = Nameplate {
            rated_power_w: cfg.rated_power_w,
            phases: cfg.ac_phases(),
        };
        InverterPoller {
            device: Arc::from(cfg.id.as_str()),
            cfg,
            plate,
            link,
            reading: None,
            identity: None,
            identity_read_at: None,
            lean,
            status_read_at: None,
            observer: None,
            fresh: Freshness::default(),
        }
    }

    /// Report undecodable answers to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn IoObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// When the status values (working mode, `0x4022`, faults) were last read; on RS485
    /// they are read every few seconds, not every cycle.
    pub fn status_read_at(&self) -> Option<Duration> {
        self.status_read_at
    }

    async fn read(&self, block: ReadBlock) -> Result<Vec<u16>, LinkError> {
        self.link.read(&self.device, self.cfg.unit_id, block).await
    }

    /// One poll: the real-time blocks every cycle, identity when due.
    pub async fn poll(&mut self, now: Duration, cycle: Duration) {
        if !self.fresh.due(now) {
            return;
        }
        let status_due = !self.lean
            || self.reading.is_none()
            || self
                .status_read_at
                .is_none_or(|t| now.saturating_sub(t) >= STATUS_PERIOD);
        let result: Result<InverterReading, PollError> = async {
            let totals = self.read(saj::TOTALS).await?;
            match (status_due, self.reading.clone()) {
                (false, Some(mut reading)) => {
                    reading.refresh(saj::decode_totals(&self.plate, &totals)?);
                    Ok(reading)
                }
                _ => {
                    let realtime = self.read(saj::REALTIME).await?;
                    Ok(saj::decode_realtime(&self.plate, &realtime, &totals)?)
                }
            }
        }
        .await;
        if status_due && result.is_ok() {
            self.status_read_at = Some(now);
        }
        count_decode_error(
            &result,
            self.observer.as_deref(),
            self.link.name(),
            &self.device,
        );
        if !self
            .fresh
            .settle(&mut self.reading, result, now, cycle, &self.device)
        {
            return;
        }
        if self
            .identity_read_at
            .is_none_or(|t| now.saturating_sub(t) >= SLOW_PERIOD * 60)
        {
            self.identity_read_at = Some(now);
            if let Ok(words) = self.read(saj::IDENTITY).await {
                self.identity = saj::decode_identity(&words).ok();
            }
        }
    }
}

pub struct MeterPoller {
    pub cfg: MeterConfig,
    pub device: Arc<str>,
    link: Link,
    table: Table,
    energy_block: usize,
    energy_read_at: Option<Duration>,
    pub reading: Option<MeterReading>,
    pub energy: Option<MeterEnergy>,
    observer: Option<Arc<dyn IoObserver>>,
    pub fresh: Freshness,
}

impl MeterPoller {
    pub fn new(cfg: MeterConfig, link: Link) -> MeterPoller {
        MeterPoller {
            device: Arc::from(cfg.id.as_str()),
            cfg,
            link,
            table: Table::Holding,
            energy_block: 0,
            energy_read_at: None,
            reading: None,
            energy: None,
            observer: None,
            fresh: Freshness::default(),
        }
    }

    /// Report undecodable answers to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn IoObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Read `block` from the meter's table; a meter that refuses FC03 is asked with FC04
    /// from then on (both are seen in the field).
    async fn read(&mut self, block: ReadBlock) -> Result<Vec<u16>, LinkError> {
        let block = ReadBlock {
            table: self.table,
            ..block
        };
        match self.link.read(&self.device, self.cfg.unit_id, block).await {
            Err(e) if e.is_illegal_function() && self.table == Table::Holding => {
                self.table = Table::Input;
                let block = ReadBlock {
                    table: Table::Input,
                    ..block
                };
                self.link.read(&self.device, self.cfg.unit_id, block).await
            }
            other => other,
        }
    }

    pub async fn poll(&mut self, now: Duration, cycle: Duration) {
        if !self.fresh.due(now) {
            return;
        }
        let sign = role_sign(self.cfg.role, self.cfg.invert);
        let previous_hz = self.reading.as_ref().and_then(|r| r.frequency_hz);
        let result: Result<MeterReading, PollError> =
            match self.read(chint::instant_block(self.cfg.model)).await {
                Ok(words) => decode_instant(self.cfg.model, &words, sign).map_err(PollError::from),
                Err(e) => Err(e.into()),
            };
        // The DTSU666's frequency comes with the slow reads: keep the last one.
        let result = result.map(|mut r| {
            r.frequency_hz = r.frequency_hz.or(previous_hz);
            r
        });
        count_decode_error(
            &result,
            self.observer.as_deref(),
            self.link.name(),
            &self.device,
        );
        if !self
            .fresh
            .settle(&mut self.reading, result, now, cycle, &self.device)
        {
            return;
        }
        if self
            .energy_read_at
            .is_none_or(|t| now.saturating_sub(t) >= SLOW_PERIOD)
        {
            self.energy_read_at = Some(now);
            self.poll_slow().await;
        }
    }

    async fn poll_slow(&mut self) {
        if self.cfg.model == crate::config::MeterModel::Dtsu666 {
            if let Ok(words) = self.read(chint::dtsu666::FREQUENCY).await {
                if let (Some(r), Ok(f)) = (
                    self.reading.as_mut(),
                    chint::decode_dtsu666_frequency(&words),
                ) {
                    r.frequency_hz = Some(f);
                }
            }
        }
        self.poll_energy().await;
    }

    async fn poll_energy(&mut self) {
        let blocks = chint::energy_blocks(self.cfg.model);
        while let Some(&block) = blocks.get(self.energy_block) {
            match self.read(block).await {
                Ok(words) => {
                    self.energy = decode_energy(&words).ok();
                    return;
                }
                // Firmware variants keep energy at different addresses: try the next.
                Err(e) if e.is_illegal_address() => self.energy_block += 1,
                Err(_) => return,
            }
        }
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
