//! SunSpec inverters: readings from the inverter model (101–103 int + SF, 111–113 float, or
//! 701), nameplate 120 / settings 121 for the power the limits are a percentage of, storage
//! 124 / 802 for the battery; commands through 704 or 123 (curtailment) and 124 (storage).
//!
//! What a unit falls back to when the EMS stops talking (its safety net):
//! - **704**: every limit goes out with `WMaxLimPctRvrt` = the unit's safe limit,
//!   `WMaxLimPctEnaRvrt` = 1 and `WMaxLimPctRvrtTms` = the revert time, so the unit itself
//!   returns to the safe limit when the EMS goes quiet.
//! - **123**: the standard reverts `WMaxLimPct` to the unit's *default* when its timer runs
//!   out — on most units no limit at all. On a site with an export limit that is the opposite
//!   of safe, so 123 limits are written without a timer: the unit holds the last limit. Its
//!   own fallback (a vendor setting) is what protects the site if that limit is too high for
//!   what comes next; README says so.
//! - **124**: charge and discharge rates revert to no limit (the unit's own self-consumption)
//!   after the revert time.

use super::points::{ModelView, Ty};
use super::{Map, ModelLoc};
use crate::config::Phase;
use crate::drivers::{DecodeError, FaultFlag, InverterReading, PhaseAc, Severity, WorkingState};

/// Inverter measurement models, most preferred first.
pub const MEASURE_IDS: [u16; 7] = [103, 113, 102, 112, 101, 111, 701];

/// How a unit's output is curtailed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "model")]
pub enum Curtail {
    /// Model 704 `WMaxLimPct`, with a reversion value.
    Der704 { at: ModelLoc },
    /// Model 123 `WMaxLimPct`.
    Immediate123 { at: ModelLoc },
}

impl Curtail {
    pub fn model(&self) -> ModelLoc {
        match *self {
            Curtail::Der704 { at } | Curtail::Immediate123 { at } => at,
        }
    }

    pub fn model_id(&self) -> u16 {
        self.model().id
    }
}

/// The models of one inverter the driver uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InverterModels {
    pub measure: ModelLoc,
    pub nameplate: Option<ModelLoc>,
    pub settings: Option<ModelLoc>,
    pub curtail: Option<Curtail>,
    pub storage: Option<ModelLoc>,
    pub battery: Option<ModelLoc>,
}

impl InverterModels {
    /// Pick the models from a device's map; an error names what is missing.
    pub fn from_map(map: &Map) -> Result<InverterModels, String> {
        let measure = map.find(&MEASURE_IDS).ok_or_else(|| {
            format!(
                "no inverter model (101–103, 111–113 or 701) among models {:?}",
                map.ids()
            )
        })?;
        let curtail = map
            .find(&[704])
            .map(|at| Curtail::Der704 { at })
            .or_else(|| map.find(&[123]).map(|at| Curtail::Immediate123 { at }));
        Ok(InverterModels {
            measure,
            nameplate: map.find(&[120]),
            settings: map.find(&[121]),
            curtail,
            storage: map.find(&[124]),
            battery: map.find(&[802]),
        })
    }

    /// Models read every cycle: measurement and battery state.
    pub fn each_cycle(&self) -> Vec<ModelLoc> {
        [Some(self.measure), self.storage, self.battery]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Models read once at discovery and then rarely: ratings and the control model (its
    /// scale factor, and what it holds, for read-back).
    pub fn slow(&self) -> Vec<ModelLoc> {
        [
            self.nameplate,
            self.settings,
            self.curtail.map(|c| c.model()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// SunSpec `St` (101–113) and `InvSt` (701) as our working state.
fn state(measure_id: u16, st: Option<f64>) -> WorkingState {
    let st = st.map_or(0, |v| v as u16);
    if measure_id == 701 {
        return match st {
            0 | 1 | 5 | 7 => WorkingState::Waiting,
            2 => WorkingState::Init,
            3 | 4 => WorkingState::OnGrid,
            6 => WorkingState::Fault,
            _ => WorkingState::Running,
        };
    }
    match st {
        1 | 2 | 6 | 8 => WorkingState::Waiting,
        3 => WorkingState::Init,
        4 | 5 => WorkingState::OnGrid,
        7 => WorkingState::Fault,
        // Not implemented, or a vendor state: it answers and reports power.
        _ => WorkingState::Running,
    }
}

/// Event bits of 101–113 `Evt1` and 701 `Alrm` (the same list), with how much each matters.
pub const EVENT_BITS: [(&str, Severity); 16] = [
    ("ground_fault", Severity::Fault),
    ("dc_over_volt", Severity::Fault),
    ("ac_disconnect", Severity::Warning),
    ("dc_disconnect", Severity::Warning),
    ("grid_disconnect", Severity::Warning),
    ("cabinet_open", Severity::Warning),
    ("manual_shutdown", Severity::Warning),
    ("over_temp", Severity::Fault),
    ("over_frequency", Severity::Warning),
    ("under_frequency", Severity::Warning),
    ("ac_over_volt", Severity::Warning),
    ("ac_under_volt", Severity::Warning),
    ("blown_string_fuse", Severity::Warning),
    ("under_temp", Severity::Warning),
    ("memory_loss", Severity::Fault),
    ("hw_test_failure", Severity::Fault),
];

fn faults(events: Option<f64>) -> Vec<FaultFlag> {
    let bits = events.map_or(0, |v| v as u32);
    EVENT_BITS
        .iter()
        .enumerate()
        .filter(|(k, _)| bits & (1 << k) != 0)
        .map(|(_, &(name, severity))| FaultFlag { name, severity })
        .collect()
}

/// The unit's readings in our units and signs (+ AC delivered, + battery discharge).
/// `phases`: the phases the unit feeds, from the site file.
pub fn decode(
    measure: ModelView<'_>,
    storage: Option<ModelView<'_>>,
    battery: Option<ModelView<'_>>,
    phases: &[Phase],
) -> Result<InverterReading, DecodeError> {
    let is_701 = measure.def.id == 701;
    let ac_power_w = measure.value("W")?.ok_or(DecodeError::Implausible {
        field: "W (not implemented)",
        value: f64::NAN,
    })?;
    let (v_names, a_names, w_names): ([&str; 3], [&str; 3], [&str; 3]) = if is_701 {
        (
            ["VL1", "VL2", "VL3"],
            ["AL1", "AL2", "AL3"],
            ["WL1", "WL2", "WL3"],
        )
    } else {
        (
            ["PhVphA", "PhVphB", "PhVphC"],
            ["AphA", "AphB", "AphC"],
            ["", "", ""],
        )
    };
    let n = phases.len().max(1) as f64;
    let mut phase_ac = Vec::with_capacity(phases.len());
    for (k, &phase) in phases.iter().enumerate() {
        // A single-phase unit reports its one phase as phase A.
        let j = if phases.len() == 1 { 0 } else { k.min(2) };
        let voltage_v = measure.value(v_names[j])?.unwrap_or(0.0);
        let power_w = match w_names[j] {
            "" => None,
            name => measure.value(name)?,
        }
        .unwrap_or(ac_power_w / n);
        let current_a = measure.value(a_names[j])?.map_or_else(
            || {
                if voltage_v > 1.0 {
                    power_w / voltage_v
                } else {
                    0.0
                }
            },
            |a| a.abs() * power_w.signum(),
        );
        phase_ac.push(PhaseAc {
            phase,
            voltage_v,
            current_a,
            power_w,
        });
    }
    let dc_w = if is_701 { None } else { measure.value("DCW")? };
    // PV: the DC side, which on units that report storage separately (124/802) is the PV
    // input; without a DC figure, what the AC output holds beyond the battery.
    let measured_battery_w = battery.map(|b| b.value("W")).transpose()?.flatten();
    let (pv_power_w, battery_power_w) = match (dc_w, measured_battery_w, storage.is_some()) {
        (Some(pv), Some(bat), _) => (pv.max(0.0), bat),
        // 124 has no battery power: AC = PV + battery, losses aside.
        (Some(pv), None, true) => (pv.max(0.0), ac_power_w - pv.max(0.0)),
        (Some(pv), None, false) => (pv.max(0.0), 0.0),
        (None, bat, _) => {
            let bat = bat.unwrap_or(0.0);
            ((ac_power_w - bat).max(0.0), bat)
        }
    };
    let soc_pct = battery
        .map(|b| b.value("SoC"))
        .transpose()?
        .flatten()
        .or(storage.map(|s| s.value("ChaState")).transpose()?.flatten())
        .unwrap_or(0.0);
    let (st, events) = if is_701 {
        (measure.value("InvSt")?, measure.value("Alrm")?)
    } else {
        (measure.value("St")?, measure.value("Evt1")?)
    };
    Ok(InverterReading {
        state: state(measure.def.id, st),
        faults: faults(events),
        phases: phase_ac,
        ac_power_w,
        pv_power_w,
        battery_power_w,
        battery_voltage_v: battery
            .map(|b| b.value("V"))
            .transpose()?
            .flatten()
            .unwrap_or(0.0),
        battery_current_a: battery
            .map(|b| b.value("A"))
            .transpose()?
            .flatten()
            .unwrap_or(0.0),
        soc_pct,
        frequency_hz: measure.value("Hz")?.unwrap_or(0.0),
        app_mode: 0,
    })
}

/// What the unit's percentages are of: `WMax` (121), else `WRtg` (120), else the rating in
/// the site file. Never above the site file's rating: that is what the EMS plans with.
pub fn wmax_w(
    nameplate: Option<ModelView<'_>>,
    settings: Option<ModelView<'_>>,
    rated_w: f64,
) -> f64 {
    let from = |v: Option<ModelView<'_>>, name: &'static str| {
        v.and_then(|v| v.value(name).ok().flatten())
            .filter(|w| *w > 0.0)
    };
    from(settings, "WMax")
        .or_else(|| from(nameplate, "WRtg"))
        .unwrap_or(rated_w)
}

/// A curtailment to send: the cap now, the cap the unit falls back to, and after how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurtailCommand {
    pub cap_w: f64,
    pub safe_cap_w: f64,
    /// 0: hold the limit until told otherwise.
    pub revert_s: u32,
}

/// The percentage of `wmax_w` that never lets the unit deliver more than `cap_w`, as the raw
/// register value for scale factor `sf` (rounded down).
fn pct_raw(cap_w: f64, wmax_w: f64, sf: i32) -> f64 {
    let pct = (cap_w.max(0.0) / wmax_w.max(1.0) * 100.0).clamp(0.0, 100.0);
    (pct / 10f64.powi(sf) + 1e-9).floor()
}

/// The one multi-register write that sets the limit: (address, words). `sf`: the control
/// model's `WMaxLimPct_SF` (0 when the device does not implement it).
pub fn encode_curtail(
    curtail: &Curtail,
    wmax_w: f64,
    sf: i32,
    cmd: &CurtailCommand,
) -> (u16, Vec<u16>) {
    let pct = pct_raw(cmd.cap_w, wmax_w, sf);
    match *curtail {
        Curtail::Der704 { at } => {
            let safe = pct_raw(cmd.safe_cap_w, wmax_w, sf);
            let mut words = vec![1, Ty::U16.encode(pct)[0], Ty::U16.encode(safe)[0], 1];
            words.extend(Ty::U32.encode(f64::from(cmd.revert_s)));
            // 14 WMaxLimPctEna, 15 WMaxLimPct, 16 WMaxLimPctRvrt, 17 WMaxLimPctEnaRvrt,
            // 18–19 WMaxLimPctRvrtTms.
            (at.addr(14), words)
        }
        Curtail::Immediate123 { at } => {
            // 5 WMaxLimPct, 6 WinTms, 7 RvrtTms (0: hold, see the module doc), 8 RmpTms,
            // 9 WMaxLim_Ena.
            (at.addr(5), vec![Ty::U16.encode(pct)[0], 0, 0, 0, 1])
        }
    }
}

/// The limit in force as the control model holds it, in W (`None`: no limit enabled).
pub fn limit_in_force_w(curtail: &Curtail, controls: ModelView<'_>, wmax_w: f64) -> Option<f64> {
    let ena = match curtail {
        Curtail::Der704 { .. } => "WMaxLimPctEna",
        Curtail::Immediate123 { .. } => "WMaxLim_Ena",
    };
    let enabled = controls.value(ena).ok().flatten() == Some(1.0);
    let pct = controls.value("WMaxLimPct").ok().flatten()?;
    enabled.then_some(pct / 100.0 * wmax_w)
}

/// A storage setpoint through 124: + discharge, − charge, W.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageCommand {
    pub battery_w: f64,
    pub revert_s: u16,
}

/// The write that holds the battery at `cmd.battery_w` (address, words), from 124's
/// `WChaMax` (W) and `InOutWRte_SF`. Both limits are set, the one opposite the direction
/// negative, which is how units that implement 124 force a rate (a limit alone only caps).
pub fn encode_storage(
    at: ModelLoc,
    wcha_max_w: f64,
    sf: i32,
    cmd: &StorageCommand,
) -> (u16, Vec<u16>) {
    let pct = (cmd.battery_w / wcha_max_w.max(1.0) * 100.0).clamp(-100.0, 100.0);
    let raw = |p: f64| Ty::I16.encode(p / 10f64.powi(sf))[0];
    // 12 OutWRte (discharge), 13 InWRte (charge), 14 WinTms, 15 RvrtTms.
    let out_rte = raw(pct);
    let in_rte = raw(-pct);
    (at.addr(12), vec![out_rte, in_rte, 0, cmd.revert_s])
}

/// `StorCtl_Mod` (offset 5) with both limits active; written after the rates, so the mode
/// never acts on stale ones.
pub const STORAGE_BOTH_LIMITS: u16 = 0b11;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sunspec::models;

    fn loc(id: u16, start: u16) -> ModelLoc {
        ModelLoc {
            id,
            start,
            len: super::super::def_for(id).unwrap().len,
        }
    }

    #[test]
    fn a_704_limit_carries_its_safe_value_and_timer_in_one_write() {
        let c = Curtail::Der704 {
            at: loc(704, 40200),
        };
        let cmd = CurtailCommand {
            cap_w: 2500.0,
            safe_cap_w: 0.0,
            revert_s: 5,
        };
        let (addr, words) = encode_curtail(&c, 10_000.0, -1, &cmd);
        assert_eq!(addr, 40214);
        assert_eq!(words, vec![1, 250, 0, 1, 0, 5]);
    }

    #[test]
    fn a_123_limit_is_rounded_down_and_held_without_a_timer() {
        let c = Curtail::Immediate123 {
            at: loc(123, 40100),
        };
        let cmd = CurtailCommand {
            cap_w: 3333.0,
            safe_cap_w: 0.0,
            revert_s: 5,
        };
        let (addr, words) = encode_curtail(&c, 10_000.0, 0, &cmd);
        assert_eq!(addr, 40105);
        assert_eq!(words, vec![33, 0, 0, 0, 1]);
        let over = CurtailCommand {
            cap_w: 20_000.0,
            ..cmd
        };
        assert_eq!(encode_curtail(&c, 10_000.0, -2, &over).1[0], 10_000);
    }

    #[test]
    fn storage_forces_a_rate_by_both_limits() {
        let (addr, words) = encode_storage(
            loc(124, 40300),
            5000.0,
            -2,
            &StorageCommand {
                battery_w: -2500.0,
                revert_s: 5,
            },
        );
        assert_eq!(addr, 40312);
        assert_eq!(words, vec![(-5000i16) as u16, 5000, 0, 5]);
        let _ = models::STORAGE;
    }
}
