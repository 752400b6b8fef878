//! Inverter pollers: an SAJ unit's real-time blocks, or a SunSpec unit's models (found by
//! discovery), decoded by the unit's driver into one kind of reading.

use std::sync::Arc;
use std::time::Duration;

use super::{
    count_decode_error, Freshness, PollError, SLOW_PERIOD, STATUS_PERIOD, SUNSPEC_SLOW_PERIOD,
};
use crate::config::InverterConfig;
use crate::drivers::saj::{self, Identity, Nameplate};
use crate::drivers::sunspec::inverter::{Curtail, InverterModels};
use crate::drivers::sunspec::points::ModelView;
use crate::drivers::sunspec::{self, ModelLoc};
use crate::drivers::{InverterReading, ReadBlock};
use crate::io::discovery::{discover, read_model};
use crate::io::link::{Link, LinkError};
use crate::io::IoObserver;

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
            let map = discover(link, device, id).await?;
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
