//! Sending setpoints to SunSpec units: the output cap through 704 (or 123), the battery
//! through 124.
//!
//! Every 704 limit carries a revert timer and the unit's safe cap as its reversion value, and
//! is written again before half the timer has run: while the EMS runs the unit holds the
//! EMS's cap, and within the revert time of the EMS going quiet (a crash, a cut cable) it
//! falls back to the safe cap by itself. SunSpec's controls are meant for this: they are the
//! immediate controls, not stored settings. A limit that falls goes out at once; one that
//! rises waits `min_interval` unless the decision is urgent. 123 limits are held without a
//! timer (see `drivers::sunspec::inverter`).

use std::sync::Arc;
use std::time::Duration;

use super::Setpoint;
use crate::drivers::sunspec::inverter::{
    encode_curtail, encode_storage, Curtail, CurtailCommand, StorageCommand, STORAGE_BOTH_LIMITS,
};
use crate::io::link::{Link, LinkError};
use crate::io::poll::SunSpecTarget;
use crate::io::IoObserver;

/// A write as last sent, and when.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    addr: u16,
    words: Vec<u16>,
    at: Duration,
}

pub struct SunSpecActuator {
    device: Arc<str>,
    unit: u8,
    link: Link,
    observer: Option<Arc<dyn IoObserver>>,
    min_interval: Duration,
    revert: Duration,
    limit: Option<Sent>,
    storage: Option<Sent>,
    /// `StorCtl_Mod` is known to hold both limits.
    storage_mode_set: bool,
    /// The unit has been written to since the EMS started (there is something to release).
    controls: bool,
    /// Discovery found no curtailment model: the unit cannot be limited.
    uncontrollable: bool,
}

impl SunSpecActuator {
    pub fn new(device: Arc<str>, unit: u8, link: Link, revert: Duration) -> SunSpecActuator {
        SunSpecActuator {
            device,
            unit,
            link,
            observer: None,
            min_interval: Duration::ZERO,
            revert,
            limit: None,
            storage: None,
            storage_mode_set: false,
            controls: false,
            uncontrollable: false,
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn IoObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn alarm(&self) -> Option<&'static str> {
        self.uncontrollable.then_some("no_curtailment_model")
    }

    fn revert_s(&self) -> u32 {
        self.revert.as_secs_f64().ceil() as u32
    }

    /// Send `sp` at `now`. Nothing is written before discovery has found the unit's models.
    pub async fn apply(
        &mut self,
        sp: &Setpoint,
        target: Option<&SunSpecTarget>,
        now: Duration,
        urgent: bool,
    ) -> Result<usize, LinkError> {
        let Some(t) = target else {
            return Ok(0);
        };
        let mut sent = 0;
        match t.curtail {
            Some(c) => {
                let cmd = CurtailCommand {
                    cap_w: sp.command.output_cap_w,
                    safe_cap_w: sp.safe_cap_w,
                    revert_s: self.revert_s(),
                };
                let (addr, words) = encode_curtail(&c, t.wmax_w, t.limit_sf, &cmd);
                if self.limit_due(&c, addr, &words, now, urgent) {
                    self.send(addr, &words).await?;
                    self.limit = Some(Sent {
                        addr,
                        words,
                        at: now,
                    });
                    sent += 1;
                }
            }
            None if !self.uncontrollable => {
                tracing::warn!(
                    device = %self.device,
                    "the unit has neither model 704 nor 123: its output cannot be limited"
                );
                self.uncontrollable = true;
            }
            None => {}
        }
        if let Some((at, wcha_max_w, sf)) = t.storage {
            let cmd = StorageCommand {
                battery_w: sp.command.battery_w,
                revert_s: self.revert_s().min(u32::from(u16::MAX)) as u16,
            };
            let (addr, words) = encode_storage(at, wcha_max_w, sf, &cmd);
            if self.storage_due(&words, now, urgent) {
                self.send(addr, &words).await?;
                self.storage = Some(Sent {
                    addr,
                    words,
                    at: now,
                });
                sent += 1;
            }
            if !self.storage_mode_set {
                self.send(at.addr(5), &[STORAGE_BOTH_LIMITS]).await?;
                self.storage_mode_set = true;
                sent += 1;
            }
        }
        self.controls |= sent > 0;
        Ok(sent)
    }

    /// Whether the limit goes out now: never sent, falling, renewing its timer, or a change
    /// that may go (urgent, or `min_interval` since the last write).
    fn limit_due(
        &self,
        c: &Curtail,
        addr: u16,
        words: &[u16],
        now: Duration,
        urgent: bool,
    ) -> bool {
        let Some(last) = &self.limit else {
            return true;
        };
        if last.addr != addr {
            return true;
        }
        let pct_at = match c {
            Curtail::Der704 { .. } => 1,
            Curtail::Immediate123 { .. } => 0,
        };
        let falls = words.get(pct_at) < last.words.get(pct_at);
        let since = now.saturating_sub(last.at);
        let renew = matches!(c, Curtail::Der704 { .. }) && since >= self.revert / 2;
        falls || renew || (last.words != words && (urgent || since >= self.min_interval))
    }

    fn storage_due(&self, words: &[u16], now: Duration, urgent: bool) -> bool {
        let Some(last) = &self.storage else {
            return true;
        };
        let since = now.saturating_sub(last.at);
        since >= self.revert / 2 || (last.words != words && (urgent || since >= self.min_interval))
    }

    /// One multi-register write, counted; on failure nothing is known to be held.
    async fn send(&mut self, addr: u16, words: &[u16]) -> Result<(), LinkError> {
        let result = self
            .link
            .write_many(&self.device, self.unit, addr, words)
            .await;
        if let Some(o) = &self.observer {
            o.write(&self.device, addr, result.is_ok());
        }
        if result.is_err() {
            self.limit = None;
            self.storage = None;
            self.storage_mode_set = false;
        }
        result
    }

    /// Leave the unit at `cap_w` with its battery idle, both held without a timer: the EMS is
    /// leaving on purpose, and the cap keeps the site's limit on its own.
    pub async fn stop_safe(
        &mut self,
        cap_w: f64,
        target: Option<&SunSpecTarget>,
    ) -> Result<(), LinkError> {
        self.hold(Some(cap_w), 0.0, target).await
    }

    /// Give the unit back its own behaviour: no storage limits, and its output at `cap_w`
    /// (held) where the site has an export limit, else no limit.
    pub async fn release(
        &mut self,
        cap_w: Option<f64>,
        target: Option<&SunSpecTarget>,
    ) -> Result<bool, LinkError> {
        if !self.controls {
            return Ok(false);
        }
        let Some(t) = target else {
            return Ok(false);
        };
        if let Some(c) = t.curtail {
            match cap_w {
                Some(cap) => {
                    let cmd = CurtailCommand {
                        cap_w: cap,
                        safe_cap_w: cap,
                        revert_s: 0,
                    };
                    let (addr, words) = encode_curtail(&c, t.wmax_w, t.limit_sf, &cmd);
                    self.send(addr, &words).await?;
                }
                None => {
                    let ena = match c {
                        Curtail::Der704 { at } => at.addr(14),
                        Curtail::Immediate123 { at } => at.addr(9),
                    };
                    self.send(ena, &[0]).await?;
                }
            }
        }
        if let Some((at, _, _)) = t.storage {
            self.send(at.addr(5), &[0]).await?;
        }
        self.controls = false;
        Ok(true)
    }

    async fn hold(
        &mut self,
        cap_w: Option<f64>,
        battery_w: f64,
        target: Option<&SunSpecTarget>,
    ) -> Result<(), LinkError> {
        let Some(t) = target else {
            return Ok(());
        };
        if let (Some(c), Some(cap)) = (t.curtail, cap_w) {
            let cmd = CurtailCommand {
                cap_w: cap,
                safe_cap_w: cap,
                revert_s: 0,
            };
            let (addr, words) = encode_curtail(&c, t.wmax_w, t.limit_sf, &cmd);
            self.send(addr, &words).await?;
        }
        if let Some((at, wcha_max_w, sf)) = t.storage {
            let cmd = StorageCommand {
                battery_w,
                revert_s: 0,
            };
            let (addr, words) = encode_storage(at, wcha_max_w, sf, &cmd);
            self.send(addr, &words).await?;
            self.send(at.addr(5), &[STORAGE_BOTH_LIMITS]).await?;
        }
        Ok(())
    }
}
