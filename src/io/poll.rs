//! Device pollers: read a device's blocks through its link, decode them with its driver, and
//! keep its freshness. A timeout, exception or implausible frame marks the device unhealthy
//! with the reason; its last reading is kept for display only, never as if fresh. Times are
//! readings of the injected monotonic clock.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{InverterConfig, MeterConfig};
use crate::drivers::chint::{self, decode_energy, decode_instant, ChintModel};
use crate::drivers::saj::{self, Identity, Nameplate};
use crate::drivers::sunspec::inverter::{Curtail, InverterModels};
use crate::drivers::sunspec::points::ModelView;
use crate::drivers::sunspec::{self, ModelLoc};
use crate::drivers::{role_sign, InverterReading, MeterEnergy, MeterReading, ReadBlock, Table};
use crate::io::discovery::{discover, read_model, DiscoveryError};
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
/// A SunSpec unit's ratings and control model (read back) are read this often.
const SUNSPEC_SLOW_PERIOD: Duration = Duration::from_secs(60);

/// Why a poll got no reading.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("bad data: {0}")]
    Decode(#[from] crate::drivers::DecodeError),
    #[error("SunSpec discovery: {0}")]
    Discovery(String),
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

/// How a unit is read: the driver its site-file model names, and what that driver keeps.
enum InverterDriver {
    Saj { plate: Nameplate },
    SunSpec(Box<SunSpecUnit>),
}

/// What a SunSpec unit told us about itself: its models (found by discovery), the power its
/// percentages are of, and the scale factors its writes need.
#[derive(Debug, Clone, Default)]
pub struct SunSpecUnit {
    pub models: Option<InverterModels>,
    /// Every model ID the map holds, in order.
    pub map_ids: Vec<u16>,
    /// Common model 1, for the unit's identity.
    common: Option<ModelLoc>,
    /// `WMax` (121), else `WRtg` (120), else the site file's rating.
    pub wmax_w: f64,
    /// `WMaxLimPct_SF` of the control model.
    pub limit_sf: i32,
    /// 124 `WChaMax` (W) and `InOutWRte_SF`, when the unit has storage.
    pub storage_scale: Option<(f64, i32)>,
    /// The limit the control model held when last read, W (`None`: none enabled).
    pub limit_in_force_w: Option<f64>,
    /// Model 1's serial number, as identity.
    identity: Option<Identity>,
    slow_read_at: Option<Duration>,
}

/// What a SunSpec actuator needs from discovery to write to the unit.
#[derive(Debug, Clone, PartialEq)]
pub struct SunSpecTarget {
    pub curtail: Option<Curtail>,
    pub wmax_w: f64,
    pub limit_sf: i32,
    pub storage: Option<(ModelLoc, f64, i32)>,
}

pub struct InverterPoller {
    pub cfg: InverterConfig,
    pub device: Arc<str>,
    driver: InverterDriver,
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
        let driver = if cfg.model.is_saj() {
            InverterDriver::Saj {
                plate: Nameplate {
                    rated_power_w: cfg.rated_power_w,
                    phases: cfg.ac_phases(),
                },
            }
        } else {
            InverterDriver::SunSpec(Box::new(SunSpecUnit {
                wmax_w: cfg.rated_power_w,
                ..SunSpecUnit::default()
            }))
        };
        InverterPoller {
            device: Arc::from(cfg.id.as_str()),
            cfg,
            driver,
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

    /// A SunSpec unit's discovered models and scales (`None` for other drivers).
    pub fn sunspec(&self) -> Option<&SunSpecUnit> {
        match &self.driver {
            InverterDriver::SunSpec(u) => Some(u),
            InverterDriver::Saj { .. } => None,
        }
    }

    /// What a SunSpec actuator writes through, once discovery has run.
    pub fn sunspec_target(&self) -> Option<SunSpecTarget> {
        let u = self.sunspec()?;
        let models = u.models.as_ref()?;
        Some(SunSpecTarget {
            curtail: models.curtail,
            wmax_w: u.wmax_w,
            limit_sf: u.limit_sf,
            storage: models
                .storage
                .zip(u.storage_scale)
                .map(|(at, (w, sf))| (at, w, sf)),
        })
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
        let result = match &self.driver {
            InverterDriver::Saj { plate } => self.poll_saj(plate.clone(), status_due).await,
            InverterDriver::SunSpec(_) => self.poll_sunspec(now).await,
        };
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
        if let InverterDriver::SunSpec(u) = &self.driver {
            self.identity = u.identity.clone();
        }
        if matches!(self.driver, InverterDriver::Saj { .. })
            && self
                .identity_read_at
                .is_none_or(|t| now.saturating_sub(t) >= SLOW_PERIOD * 60)
        {
            self.identity_read_at = Some(now);
            if let Ok(words) = self.read(saj::IDENTITY).await {
                self.identity = saj::decode_identity(&words).ok();
            }
        }
    }

    async fn poll_saj(
        &self,
        plate: Nameplate,
        status_due: bool,
    ) -> Result<InverterReading, PollError> {
        let totals = self.read(saj::TOTALS).await?;
        match (status_due, self.reading.clone()) {
            (false, Some(mut reading)) => {
                reading.refresh(saj::decode_totals(&plate, &totals)?);
                Ok(reading)
            }
            _ => {
                let realtime = self.read(saj::REALTIME).await?;
                Ok(saj::decode_realtime(&plate, &realtime, &totals)?)
            }
        }
    }

    /// Discover the unit's models once, read its ratings and control model now and then,
    /// and its measurements every cycle.
    async fn poll_sunspec(&mut self, now: Duration) -> Result<InverterReading, PollError> {
        let InverterDriver::SunSpec(unit) = &self.driver else {
            return Err(PollError::Discovery("not a SunSpec unit".into()));
        };
        let mut unit = unit.clone();
        let result = self.poll_sunspec_unit(&mut unit, now).await;
        if let Err(PollError::Link(e)) = &result {
            // A model gone from where it was (new firmware): find the models again.
            if e.is_illegal_address() {
                unit.models = None;
            }
        }
        self.driver = InverterDriver::SunSpec(unit);
        result
    }

    async fn poll_sunspec_unit(
        &self,
        unit: &mut SunSpecUnit,
        now: Duration,
    ) -> Result<InverterReading, PollError> {
        let (link, device, id) = (&self.link, &self.device, self.cfg.unit_id);
        if unit.models.is_none() {
            let map = discover(link, device, id).await.map_err(|e| match e {
                DiscoveryError::Link(l) => PollError::Link(l),
                other => PollError::Discovery(other.to_string()),
            })?;
            unit.models = Some(InverterModels::from_map(&map).map_err(PollError::Discovery)?);
            unit.map_ids = map.ids();
            unit.common = map.find(&[1]);
            unit.slow_read_at = None;
        }
        let Some(models) = unit.models.clone() else {
            return Err(PollError::Discovery("no models".into()));
        };
        if unit
            .slow_read_at
            .is_none_or(|t| now.saturating_sub(t) >= SUNSPEC_SLOW_PERIOD)
        {
            let mut slow = Vec::new();
            for m in models.slow().into_iter().chain(unit.common) {
                slow.push((m, read_model(link, device, id, &m).await?));
            }
            let view = |want: Option<ModelLoc>| {
                let want = want?;
                let (m, w) = slow.iter().find(|(m, _)| *m == want)?;
                Some(ModelView::new(m.def()?, w))
            };
            unit.wmax_w = sunspec::inverter::wmax_w(
                view(models.nameplate),
                view(models.settings),
                self.cfg.rated_power_w,
            )
            .min(self.cfg.rated_power_w);
            if let Some(c) = models.curtail {
                let controls = view(Some(c.model()));
                unit.limit_sf = controls.and_then(|v| v.scale_of("WMaxLimPct")).unwrap_or(0);
                unit.limit_in_force_w =
                    controls.and_then(|v| sunspec::inverter::limit_in_force_w(&c, v, unit.wmax_w));
            }
            unit.identity = view(unit.common).map(|v| Identity {
                device_type: models.measure.id,
                serial: v.string("SN").unwrap_or_default(),
            });
            unit.slow_read_at = Some(now);
        }
        let mut fast = Vec::new();
        for m in models.each_cycle() {
            fast.push((m, read_model(link, device, id, &m).await?));
        }
        let view = |want: Option<ModelLoc>| {
            let want = want?;
            let (m, w) = fast.iter().find(|(m, _)| *m == want)?;
            Some(ModelView::new(m.def()?, w))
        };
        let measure = view(Some(models.measure)).ok_or(PollError::Discovery(format!(
            "model {} has no definition here",
            models.measure.id
        )))?;
        let storage = view(models.storage);
        unit.storage_scale = storage.and_then(|s| {
            let w = s.value("WChaMax").ok().flatten()?;
            Some((w, s.scale_of("OutWRte").unwrap_or(0)))
        });
        Ok(sunspec::inverter::decode(
            measure,
            storage,
            view(models.battery),
            &self.cfg.ac_phases(),
        )?)
    }
}

pub struct MeterPoller {
    pub cfg: MeterConfig,
    pub device: Arc<str>,
    link: Link,
    table: Table,
    energy_block: usize,
    energy_read_at: Option<Duration>,
    /// A SunSpec meter's model, once discovered.
    sunspec_model: Option<ModelLoc>,
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
            sunspec_model: None,
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
        let result = match ChintModel::of(self.cfg.model) {
            Some(model) => match self.read(chint::instant_block(model)).await {
                Ok(words) => decode_instant(model, &words, sign).map_err(PollError::from),
                Err(e) => Err(e.into()),
            },
            None => self.poll_sunspec(sign).await,
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

    /// A SunSpec meter: found once, then its one model read whole (energy included).
    async fn poll_sunspec(&mut self, sign: f64) -> Result<MeterReading, PollError> {
        let (link, device, unit) = (&self.link, &self.device, self.cfg.unit_id);
        let model = match self.sunspec_model {
            Some(m) => m,
            None => {
                let map = discover(link, device, unit).await.map_err(|e| match e {
                    DiscoveryError::Link(l) => PollError::Link(l),
                    other => PollError::Discovery(other.to_string()),
                })?;
                let m = map.find(&sunspec::meter::METER_IDS).ok_or_else(|| {
                    PollError::Discovery(format!(
                        "no meter model (201–204) among models {:?}",
                        map.ids()
                    ))
                })?;
                self.sunspec_model = Some(m);
                m
            }
        };
        let words = match read_model(link, device, unit, &model).await {
            Err(e) if e.is_illegal_address() => {
                self.sunspec_model = None;
                return Err(e.into());
            }
            other => other?,
        };
        let def = model
            .def()
            .ok_or_else(|| PollError::Discovery(format!("model {} unknown", model.id)))?;
        let view = ModelView::new(def, &words);
        let phases = if model.id == 201 { 1 } else { 3 };
        self.energy = sunspec::meter::decode_energy(view);
        Ok(sunspec::meter::decode(view, sign, phases)?)
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
        let Some(model) = ChintModel::of(self.cfg.model) else {
            return;
        };
        let blocks = chint::energy_blocks(model);
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
