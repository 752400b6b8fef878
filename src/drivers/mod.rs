//! Device drivers: which registers to read, and how to turn them into readings in our units
//! and signs (docs/design.md §2). Vendor quirks — scale exponents, float layouts, kW vs W, sign
//! conventions — are converted here and nowhere else. Decoding is pure: register words in,
//! a reading or a [`DecodeError`] out.

pub mod chint;
pub mod saj;
pub mod sunspec;

use serde::Serialize;

use crate::config::{MeterRole, Phase};

/// What a unit is told, in our signs, whatever its driver: each driver encodes it (and
/// clamps it to the unit's rating and registers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Command {
    /// + discharge, − charge.
    pub battery_w: f64,
    /// Most AC power the unit may deliver.
    pub output_cap_w: f64,
}

/// Every fault and warning flag the driver for `model` reports, for metrics that exist
/// before the first fault does.
pub fn fault_flags(
    model: crate::config::InverterModel,
) -> Box<dyn Iterator<Item = (&'static str, Severity)>> {
    if model.is_saj() {
        Box::new(saj::fault_flags())
    } else {
        Box::new(sunspec::inverter::EVENT_BITS.iter().copied())
    }
}

/// Modbus register table a block is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// FC03.
    Holding,
    /// FC04.
    Input,
    /// FC02, one bit per address (read as 0/1 words).
    Discrete,
}

/// One block read: at most 125 registers (the Modbus limit for FC03/FC04).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBlock {
    pub table: Table,
    pub start: u16,
    pub count: u16,
}

impl ReadBlock {
    pub const fn holding(start: u16, count: u16) -> ReadBlock {
        assert!(count >= 1 && count <= MAX_READ_REGISTERS);
        ReadBlock {
            table: Table::Holding,
            start,
            count,
        }
    }
}

impl ReadBlock {
    /// FC02 discrete inputs (at most 2000 per request).
    pub fn discrete(start: u16, count: u16) -> ReadBlock {
        ReadBlock {
            table: Table::Discrete,
            start,
            count: count.clamp(1, 2000),
        }
    }
}

/// Modbus limit for one read request (FC03/FC04).
pub const MAX_READ_REGISTERS: u16 = 125;

/// Registers that cannot be what the device meant: the device is unhealthy this cycle.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} registers, got {got}")]
    Length { expected: usize, got: usize },
    #[error("{field} = {value} is implausible")]
    Implausible { field: &'static str, value: f64 },
}

/// Check a decoded value against physical bounds.
pub(crate) fn plausible(
    field: &'static str,
    value: f64,
    min: f64,
    max: f64,
) -> Result<f64, DecodeError> {
    if value.is_finite() && value >= min && value <= max {
        Ok(value)
    } else {
        Err(DecodeError::Implausible { field, value })
    }
}

pub(crate) fn expect_len(words: &[u16], expected: usize) -> Result<(), DecodeError> {
    if words.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::Length {
            expected,
            got: words.len(),
        })
    }
}

/// AC quantities on one phase, in our signs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PhaseAc {
    pub phase: Phase,
    pub voltage_v: f64,
    /// Signed like `power_w`.
    pub current_a: f64,
    pub power_w: f64,
}

/// Severity of a decoded fault bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The unit cannot be relied on to follow setpoints.
    Fault,
    /// Reported, but the unit keeps working (grid out of range, BMS link warning).
    Warning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultFlag {
    pub name: &'static str,
    pub severity: Severity,
}

/// The inverter's operating state (SAJ `MPVMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkingState {
    Init,
    Waiting,
    Running,
    OffGrid,
    OnGrid,
    Fault,
    Update,
    Test,
    SelfCheck,
    Reset,
}

/// One inverter's measurements, in W, V, A, % and our signs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InverterReading {
    pub state: WorkingState,
    pub faults: Vec<FaultFlag>,
    /// AC at the unit's grid port, per phase it feeds; + = delivered to the site bus.
    pub phases: Vec<PhaseAc>,
    pub ac_power_w: f64,
    pub pv_power_w: f64,
    /// + discharge, − charge.
    pub battery_power_w: f64,
    pub battery_voltage_v: f64,
    pub battery_current_a: f64,
    pub soc_pct: f64,
    pub frequency_hz: f64,
    /// Read back from the unit: 0 self-use, 1 time-of-use, 2 back-up, 3 passive.
    pub app_mode: u16,
}

impl InverterReading {
    pub fn has_fault(&self) -> bool {
        self.state == WorkingState::Fault
            || self.faults.iter().any(|f| f.severity == Severity::Fault)
    }
}

/// One meter's measurements. For a grid meter + = import; for a PV meter + = generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterReading {
    pub power_w: f64,
    pub phases: Vec<PhaseAc>,
    /// Read with the slow values on the DTSU666.
    pub frequency_hz: Option<f64>,
}

/// Energy counters, read less often than power.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeterEnergy {
    pub import_wh: f64,
    pub export_wh: f64,
}

/// The sign that turns a meter's forward power (+ towards the site, as wired) into our
/// convention for its role: + import for a grid meter, + generation for a PV meter.
pub fn role_sign(role: MeterRole, invert: bool) -> f64 {
    let base = match role {
        MeterRole::Grid => 1.0,
        MeterRole::Pv => -1.0,
    };
    if invert {
        -base
    } else {
        base
    }
}
