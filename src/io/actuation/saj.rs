//! Sending setpoints to SAJ inverters: the driver encodes and clamps, this decides what goes
//! on the wire and in which order, and what the unit is left with when the EMS stops.
//! The unit's own export limit (`0x365A` with anti-reflux on) is its safety net: it holds
//! with or without the EMS.
//!
//! Write discipline — the settings live in inverter memory of limited write endurance:
//! - **safety first**: the output cap is written first whenever it falls or is not known to
//!   be in place (after takeover, after any failed write, after a read-back that differs),
//!   then the anti-reflux switch that makes it act; only then the battery and the mode;
//! - **only what matters**: a register is written when its value changes; a change that is
//!   not a safety decrease waits until `min_interval` has passed since the register (or the
//!   battery group) was last written, unless the decision is urgent (a limit crossed now);
//! - **read back, not hammered**: the control registers are read back every
//!   [`READBACK_EVERY`] and anything that differs is written again; a unit that does not
//!   confirm passive mode at `0x4022` gets the mode re-written [`CONFIRM_ATTEMPTS`] times,
//!   then an alarm, not a write every cycle.

use std::sync::Arc;
use std::time::Duration;

use crate::drivers::saj::{self, app_mode, reg, Command};
use crate::io::link::{Link, LinkError};
use crate::io::IoObserver;

/// How often the control registers are read back.
pub const READBACK_EVERY: Duration = Duration::from_secs(60);
/// Re-writes of the mode a unit gets when it does not confirm passive mode, before an alarm.
pub const CONFIRM_ATTEMPTS: u32 = 3;

/// Written as one: a magnitude means nothing without its direction.
const BATTERY_GROUP: [u16; 3] = [
    reg::PASSIVE_BAT_DISCHARGE,
    reg::PASSIVE_BAT_CHARGE,
    reg::PASSIVE_ENABLE,
];

/// Something the operator should look at; the EMS has stopped trying to fix it by writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alarm {
    /// `0x4022` never showed passive mode after the mode was written again and again.
    PassiveNotConfirmed,
    /// `0x3635` reads 0: anti-reflux is off in the unit, so `0x365A` does not act and nothing
    /// in the unit limits its export when the EMS is not there. It configures the unit's meter
    /// port (master mode polls a meter), so the EMS leaves it to the installer.
    InverterLimitOff,
}

impl Alarm {
    pub fn label(self) -> &'static str {
        match self {
            Alarm::PassiveNotConfirmed => "passive_not_confirmed",
            Alarm::InverterLimitOff => "inverter_limit_off",
        }
    }
}

/// A register's value on the unit as far as we know, and when we last wrote it.
#[derive(Debug, Clone, Copy)]
struct Held {
    value: u16,
    written_at: Option<Duration>,
}

pub struct SajActuator {
    device: Arc<str>,
    unit: u8,
    rated_w: f64,
    link: Link,
    observer: Option<Arc<dyn IoObserver>>,
    min_interval: Duration,
    /// What the unit holds, per controlled register; absent when unsure.
    held: Vec<(u16, Held)>,
    /// The unit's own values of the registers we take over.
    original: Option<Vec<(u16, u16)>>,
    /// Set when `original` was learnt from the unit (not from the store): to be stored.
    original_is_new: bool,
    read_back_at: Option<Duration>,
    /// `0x3647` read back other than we wrote it: real evidence, so the mode is written
    /// again even while the alarm holds back re-writes `0x4022` asks for.
    mode_read_back_differs: bool,
    /// The `0x4022` reading last weighed by [`SajActuator::confirm_mode`].
    mode_checked_at: Option<Duration>,
    unconfirmed: u32,
    pub alarm: Option<Alarm>,
}

impl SajActuator {
    pub fn new(device: Arc<str>, unit: u8, rated_w: f64, link: Link) -> SajActuator {
        SajActuator {
            device,
            unit,
            rated_w,
            link,
            observer: None,
            min_interval: Duration::ZERO,
            held: Vec::new(),
            original: None,
            original_is_new: false,
            read_back_at: None,
            mode_read_back_differs: false,
            mode_checked_at: None,
            unconfirmed: 0,
            alarm: None,
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

    /// The unit's own settings as kept from an earlier run (the store survives restarts; a
    /// unit found in passive mode may be in ours).
    pub fn with_original(mut self, original: Option<Vec<(u16, u16)>>) -> Self {
        self.original = original;
        self
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn controls(&self) -> bool {
        self.original.is_some()
    }

    /// The unit's own settings, once, right after they were learnt from the unit.
    pub fn take_new_original(&mut self) -> Option<Vec<(u16, u16)>> {
        if std::mem::take(&mut self.original_is_new) {
            self.original.clone()
        } else {
            None
        }
    }

    fn held(&self, addr: u16) -> Option<Held> {
        self.held.iter().find(|(a, _)| *a == addr).map(|(_, h)| *h)
    }

    fn set_held(&mut self, addr: u16, value: u16, written_at: Option<Duration>) {
        match self.held.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, h)) => *h = Held { value, written_at },
            None => self.held.push((addr, Held { value, written_at })),
        }
    }

    fn forget(&mut self, addr: u16) {
        self.held.retain(|(a, _)| *a != addr);
    }

    /// What `0x4022` said the unit runs, read at `read_at`. Not passive while we control
    /// it: write the mode again, a bounded number of times, then raise the alarm and stop
    /// writing it. Only a read taken after our last write of the mode counts (the same
    /// reading seen again, or one older than the write, says nothing new).
    pub fn confirm_mode(&mut self, reported: u16, read_at: Duration) {
        let after_write = self
            .held(reg::APP_MODE)
            .and_then(|h| h.written_at)
            .is_none_or(|w| read_at > w);
        let seen = self.mode_checked_at.is_some_and(|t| read_at <= t);
        if !self.controls() || !after_write || seen {
            return;
        }
        self.mode_checked_at = Some(read_at);
        if reported == app_mode::PASSIVE {
            self.unconfirmed = 0;
            if self.alarm == Some(Alarm::PassiveNotConfirmed) {
                self.alarm = None;
            }
        } else if self.unconfirmed < CONFIRM_ATTEMPTS {
            self.unconfirmed += 1;
            self.forget(reg::APP_MODE);
            for addr in BATTERY_GROUP {
                self.forget(addr);
            }
        } else if self.alarm != Some(Alarm::PassiveNotConfirmed) {
            tracing::warn!(
                device = %self.device,
                reported,
                "the unit does not confirm passive mode after {CONFIRM_ATTEMPTS} writes; \
                 the mode is written again only if 0x3647 reads back otherwise"
            );
            self.alarm = Some(Alarm::PassiveNotConfirmed);
        }
    }

    async fn read_control_block(&mut self) -> Result<Vec<u16>, LinkError> {
        self.link
            .read(&self.device, self.unit, saj::CONTROL_BLOCK)
            .await
    }

    fn word(words: &[u16], addr: u16) -> Option<u16> {
        words
            .get(usize::from(addr.wrapping_sub(saj::CONTROL_BLOCK.start)))
            .copied()
    }

    /// Learn the unit's own settings (first takeover) and what its control registers hold
    /// (then every [`READBACK_EVERY`]).
    async fn read_back(&mut self, now: Duration) -> Result<(), LinkError> {
        let due = self
            .read_back_at
            .is_none_or(|t| now.saturating_sub(t) >= READBACK_EVERY);
        if !due {
            return Ok(());
        }
        let words = self.read_control_block().await?;
        self.read_back_at = Some(now);
        if self.original.is_none() {
            self.original = Some(original_from(&words));
            self.original_is_new = true;
        }
        let limit_off = Self::word(&words, reg::PREVENT_REVERSE_FLOW) == Some(0);
        match self.alarm {
            None if limit_off => {
                tracing::warn!(
                    device = %self.device,
                    "0x3635 is 0: anti-reflux is off in the unit, so its export limit (0x365A) \
                     does not act without the EMS; set it on the unit (1, the unit's own meter)"
                );
                self.alarm = Some(Alarm::InverterLimitOff);
            }
            Some(Alarm::InverterLimitOff) if !limit_off => self.alarm = None,
            _ => {}
        }
        for addr in saj::CONTROLLED {
            let Some(value) = Self::word(&words, addr) else {
                continue;
            };
            match self.held(addr) {
                Some(h) if h.value == value => {}
                Some(h) => {
                    self.mode_read_back_differs |= addr == reg::APP_MODE;
                    tracing::info!(
                        device = %self.device,
                        register = format!("{addr:#06x}"),
                        expected = h.value,
                        found = value,
                        "control register changed behind our back; writing it again"
                    );
                    self.forget(addr);
                }
                None => self.set_held(addr, value, None),
            }
        }
        Ok(())
    }

    /// Send `cmd` at `now`. `urgent`: a limit is crossed now, so every change goes at once.
    /// Returns how many registers were written.
    pub async fn apply(
        &mut self,
        cmd: &Command,
        now: Duration,
        urgent: bool,
    ) -> Result<usize, LinkError> {
        if self.original.is_none() {
            // Takeover: learn the unit's own settings before anything is written.
            self.read_back(now).await?;
        }
        // The cap goes out first whenever it falls or is not known to be in place.
        let want = saj::encode_command(self.rated_w, cmd);
        let value_of = |addr: u16| want.iter().find(|(a, _)| *a == addr).map(|(_, v)| *v);
        let mut sent = 0;
        if let Some(cap) = value_of(reg::ANTI_REFLUX_POWER) {
            if self
                .held(reg::ANTI_REFLUX_POWER)
                .is_none_or(|h| cap < h.value)
            {
                sent += self.write(reg::ANTI_REFLUX_POWER, cap, now).await?;
            }
        }
        if let Some(on) = value_of(reg::ANTI_REFLUX_MODE) {
            if self
                .held(reg::ANTI_REFLUX_MODE)
                .is_none_or(|h| h.value != on)
            {
                sent += self.write(reg::ANTI_REFLUX_MODE, on, now).await?;
            }
        }
        if let Err(e) = self.read_back(now).await {
            // Only the check is lost: the writes below still go out, and the read is
            // tried again next cycle.
            tracing::debug!(device = %self.device, "control registers not read back: {e}");
        }
        // The battery registers, as a group, then the mode, then a cap that rises.
        let battery: Vec<(u16, u16)> = want
            .iter()
            .copied()
            .filter(|(a, _)| BATTERY_GROUP.contains(a))
            .collect();
        if urgent || self.may_write(&battery, now) {
            for (addr, value) in battery {
                if self.held(addr).is_none_or(|h| h.value != value) {
                    sent += self.write(addr, value, now).await?;
                }
            }
        }
        if let Some(mode) = value_of(reg::APP_MODE) {
            let alarmed = self.alarm == Some(Alarm::PassiveNotConfirmed);
            let differs = self.held(reg::APP_MODE).is_none_or(|h| h.value != mode);
            if differs && (!alarmed || self.mode_read_back_differs) {
                sent += self.write(reg::APP_MODE, mode, now).await?;
                self.mode_read_back_differs = false;
            }
        }
        if let Some(cap) = value_of(reg::ANTI_REFLUX_POWER) {
            if self.may_write(&[(reg::ANTI_REFLUX_POWER, cap)], now) {
                sent += self.write(reg::ANTI_REFLUX_POWER, cap, now).await?;
            }
        }
        Ok(sent)
    }

    /// Whether `changes` hold a value to send that may go now: each register that would be
    /// written (for the battery registers, any of the group) last written `min_interval` ago
    /// or more, or not known.
    fn may_write(&self, changes: &[(u16, u16)], now: Duration) -> bool {
        let waited = |addr: u16| {
            self.held(addr)
                .and_then(|h| h.written_at)
                .is_none_or(|t| now.saturating_sub(t) >= self.min_interval)
        };
        let differs = changes
            .iter()
            .any(|&(a, v)| self.held(a).is_none_or(|h| h.value != v));
        let group = changes.iter().any(|(a, _)| BATTERY_GROUP.contains(a));
        differs
            && if group {
                BATTERY_GROUP.iter().all(|&a| waited(a))
            } else {
                changes.iter().all(|&(a, _)| waited(a))
            }
    }

    /// One register, counted; on failure the register is unknown (so a cap goes out first
    /// next time) and the error ends this cycle's writes to the unit.
    async fn write(&mut self, addr: u16, value: u16, now: Duration) -> Result<usize, LinkError> {
        let result = self.link.write(&self.device, self.unit, addr, value).await;
        if let Some(o) = &self.observer {
            o.write(&self.device, addr, result.is_ok());
        }
        match result {
            Ok(()) => {
                self.set_held(addr, value, Some(now));
                Ok(1)
            }
            Err(e) => {
                self.forget(addr);
                self.forget(reg::ANTI_REFLUX_POWER);
                Err(e)
            }
        }
    }

    /// Leave the unit safe without the EMS: output cap at `cap_w` (written first), export
    /// limiting on, battery idle in passive mode.
    pub async fn stop_safe(&mut self, cap_w: f64) -> Result<(), LinkError> {
        let cmd = Command {
            battery_w: 0.0,
            output_cap_w: cap_w,
        };
        self.write_in_order(stop_order(saj::encode_command(self.rated_w, &cmd)))
            .await
    }

    /// Every write of `writes`, in order, stopping at the first failure; what the unit
    /// holds is unknown afterwards (nobody is left to keep track).
    async fn write_in_order(&mut self, writes: Vec<(u16, u16)>) -> Result<(), LinkError> {
        self.held.clear();
        for (addr, value) in writes {
            let result = self.link.write(&self.device, self.unit, addr, value).await;
            if let Some(o) = &self.observer {
                o.write(&self.device, addr, result.is_ok());
            }
            result?;
        }
        Ok(())
    }

    /// Give the unit back its own settings, but with export limiting on and its cap at
    /// `cap_w` or lower when the site has an export limit (`cap_w` is `None` when it has
    /// none). Returns whether there was anything to give back.
    pub async fn release(&mut self, cap_w: Option<f64>) -> Result<bool, LinkError> {
        let Some(original) = self.original.clone() else {
            return Ok(false);
        };
        self.write_in_order(release_values(&original, self.rated_w, cap_w))
            .await?;
        self.original = None;
        Ok(true)
    }
}

/// The unit's own settings from its control block. A unit already in passive mode is in a
/// mode an EMS set (ours before a crash, or another's): its values are not its own, so the
/// register map's defaults stand in for them.
fn original_from(words: &[u16]) -> Vec<(u16, u16)> {
    let in_passive = SajActuator::word(words, reg::APP_MODE) == Some(app_mode::PASSIVE);
    saj::CONTROLLED
        .iter()
        .filter_map(|&addr| {
            let value = if in_passive {
                saj::setting(addr)?.default
            } else {
                SajActuator::word(words, addr)?
            };
            Some((addr, value))
        })
        .collect()
}

/// Safety registers first (cap, then the switch that makes it act), the mode last.
fn stop_order(mut writes: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    writes.sort_by_key(|(a, _)| match *a {
        reg::ANTI_REFLUX_POWER => 0,
        reg::ANTI_REFLUX_MODE => 1,
        reg::APP_MODE => 3,
        _ => 2,
    });
    writes
}

/// The register values `release` writes: the originals, the cap no higher than `cap_w` and
/// export limiting on whenever the site has a limit.
fn release_values(original: &[(u16, u16)], rated_w: f64, cap_w: Option<f64>) -> Vec<(u16, u16)> {
    let mut values: Vec<(u16, u16)> = original
        .iter()
        .map(|&(addr, value)| {
            let value =
                saj::setting(addr).map_or(value, |s| saj::clamp_setting(s, f64::from(value)));
            (addr, value)
        })
        .collect();
    if let Some(cap_w) = cap_w {
        let cap = saj::watts_to_permille(cap_w.max(0.0), rated_w, 1000);
        for (addr, value) in values.iter_mut() {
            match *addr {
                reg::ANTI_REFLUX_POWER => *value = (*value).min(cap),
                reg::ANTI_REFLUX_MODE if *value == 0 => *value = 1,
                _ => {}
            }
        }
    }
    stop_order(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(app: u16, mode: u16, cap: u16) -> Vec<u16> {
        let mut w = vec![0u16; saj::CONTROL_BLOCK.count as usize];
        let at = |a: u16| usize::from(a - saj::CONTROL_BLOCK.start);
        w[at(reg::APP_MODE)] = app;
        w[at(reg::ANTI_REFLUX_MODE)] = mode;
        w[at(reg::ANTI_REFLUX_POWER)] = cap;
        w
    }

    fn get(values: &[(u16, u16)], addr: u16) -> u16 {
        values.iter().find(|(a, _)| *a == addr).unwrap().1
    }

    #[test]
    fn a_unit_found_in_passive_mode_is_given_the_map_defaults_as_its_own() {
        let own = original_from(&block(app_mode::SELF_USE, 1, 300));
        assert_eq!(get(&own, reg::ANTI_REFLUX_POWER), 300);
        let found_passive = original_from(&block(app_mode::PASSIVE, 1, 668));
        assert_eq!(
            get(&found_passive, reg::APP_MODE),
            saj::setting(reg::APP_MODE).unwrap().default
        );
        assert_ne!(get(&found_passive, reg::APP_MODE), app_mode::PASSIVE);
    }

    #[test]
    fn release_never_switches_export_limiting_off_on_a_limited_site() {
        let own = original_from(&block(app_mode::SELF_USE, 0, 1000));
        let out = release_values(&own, 10_000.0, Some(2000.0));
        assert_eq!(get(&out, reg::ANTI_REFLUX_MODE), 1);
        assert_eq!(get(&out, reg::ANTI_REFLUX_POWER), 200);
        assert_eq!(out[0].0, reg::ANTI_REFLUX_POWER, "cap first: {out:?}");
        assert_eq!(out.last().unwrap().0, reg::APP_MODE);
        // A site without a limit gets exactly its own values back.
        let free = release_values(&own, 10_000.0, None);
        assert_eq!(get(&free, reg::ANTI_REFLUX_MODE), 0);
    }
}
