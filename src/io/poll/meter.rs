//! Meter pollers: a Chint meter's instantaneous and energy blocks (FC03, or FC04 where the
//! meter refuses FC03), or a SunSpec meter's model.

use std::sync::Arc;
use std::time::Duration;

use super::{count_decode_error, Freshness, PollError, SLOW_PERIOD};
use crate::config::MeterConfig;
use crate::drivers::chint::{self, decode_energy, decode_instant, ChintModel};
use crate::drivers::sunspec::points::ModelView;
use crate::drivers::sunspec::{self, ModelLoc};
use crate::drivers::{role_sign, MeterEnergy, MeterReading, ReadBlock, Table};
use crate::io::discovery::{discover, read_model};
use crate::io::link::{Link, LinkError};
use crate::io::IoObserver;

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
                let map = discover(link, device, unit).await?;
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
