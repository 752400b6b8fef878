//! What the controller needs from the site file, as plain numbers.

use chrono_tz::Tz;

use crate::calendar::Window;
use crate::config::{
    ConflictPriority, GridLimitConfig, Phase, SiteConfig, TouKind, WorkingMode, WorkingModeConfig,
};

/// A limit at the grid connection, per phase or for the sum of phases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GridLimit {
    /// Sum of phases, W.
    Total(f64),
    /// Every phase, W.
    PhasePower(f64),
    /// Every phase, A (turned into W with the measured phase voltage).
    PhaseCurrent(f64),
}

impl From<GridLimitConfig> for GridLimit {
    fn from(c: GridLimitConfig) -> GridLimit {
        match c {
            GridLimitConfig::TotalPower { limit_w } => GridLimit::Total(limit_w),
            GridLimitConfig::PhasePower { limit_w } => GridLimit::PhasePower(limit_w),
            GridLimitConfig::PhaseCurrent { limit_a } => GridLimit::PhaseCurrent(limit_a),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitParams {
    pub id: String,
    pub rated_w: f64,
    pub phases: Vec<Phase>,
    pub max_charge_w: f64,
    pub max_discharge_w: f64,
    pub soc_min_pct: f64,
    pub soc_max_pct: f64,
    /// Smallest step the unit's setpoint registers can express (per-mille of its rating).
    pub step_w: f64,
}

impl UnitParams {
    /// Round `w` down to a step the unit can be told: the unit never delivers more than
    /// the controller planned.
    pub fn quantize(&self, w: f64) -> f64 {
        if self.step_w > 0.0 {
            (w / self.step_w).floor() * self.step_w
        } else {
            w
        }
    }

    /// Round `w` down to a step the unit can be told, but not below `floor_w` (a battery
    /// charging at its limit stays at it).
    pub fn quantize_above(&self, w: f64, floor_w: f64) -> f64 {
        let q = self.quantize(w);
        if q < floor_w && self.step_w > 0.0 {
            (floor_w / self.step_w).ceil() * self.step_w
        } else {
            q
        }
    }

    /// Share of this unit's AC output that lands on `phase`.
    pub fn weight(&self, phase: Phase) -> f64 {
        if self.phases.contains(&phase) {
            1.0 / self.phases.len() as f64
        } else {
            0.0
        }
    }

    /// Changes smaller than this are not sent to the unit.
    pub fn deadband_w(&self, p_deadband_w: f64, p_deadband_pct: f64) -> f64 {
        p_deadband_w.max(p_deadband_pct / 100.0 * self.rated_w)
    }

    pub fn is_three_phase(&self) -> bool {
        self.phases.len() > 1
    }
}

/// A time-of-use window (local time, `calendar`'s midnight rule).
#[derive(Debug, Clone, PartialEq)]
pub struct TouWindow {
    pub kind: TouKind,
    pub window: Window,
    pub power_w: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModeParams {
    pub mode: WorkingMode,
    pub tz: Tz,
    pub windows: Vec<TouWindow>,
    pub reserve_soc_pct: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlParams {
    pub phases: Vec<Phase>,
    pub nominal_v: f64,
    pub export: GridLimit,
    pub import: Option<GridLimit>,
    pub margin_w: f64,
    pub ramp_pct_per_s: f64,
    pub deadband_w: f64,
    /// The deadband also scales with each unit's rating.
    pub deadband_pct: f64,
    /// Least time a battery keeps its direction unless the grid limit needs it to turn.
    pub direction_dwell_s: f64,
    /// Which limit holds when export and import limits cannot both be met.
    pub conflict_priority: ConflictPriority,
    pub fail_safe_after_s: f64,
    pub cycle_s: f64,
    pub mode: ModeParams,
    pub units: Vec<UnitParams>,
}

pub fn mode_params(w: &WorkingModeConfig, tz: Tz) -> ModeParams {
    ModeParams {
        mode: w.mode,
        tz,
        windows: w
            .periods
            .iter()
            .map(|p| TouWindow {
                kind: p.kind,
                window: p.window(),
                power_w: p.power_w,
            })
            .collect(),
        reserve_soc_pct: w.reserve_pct(),
    }
}

impl ControlParams {
    pub fn from_config(c: &SiteConfig) -> ControlParams {
        let tz: Tz = c.site.timezone.tz();
        ControlParams {
            phases: c.phases(),
            nominal_v: c.grid.nominal_voltage_v,
            export: GridLimit::from(c.export_limit),
            import: c.import_limit.map(GridLimit::from),
            margin_w: c.control.grid_margin_w,
            ramp_pct_per_s: c.control.ramp_pct_per_s,
            deadband_w: c.control.deadband_w,
            deadband_pct: c.control.deadband_pct,
            direction_dwell_s: c.control.direction_dwell_s,
            conflict_priority: c.control.conflict_priority,
            fail_safe_after_s: c.control.fail_safe_after_s,
            cycle_s: c.control.cycle_ms as f64 / 1000.0,
            mode: mode_params(&c.working_mode, tz),
            units: c
                .inverters
                .iter()
                .map(|i| UnitParams {
                    id: i.id.clone(),
                    rated_w: i.rated_power_w,
                    phases: i.ac_phases(),
                    max_charge_w: i.battery().max_charge_w,
                    max_discharge_w: i.battery().max_discharge_w,
                    soc_min_pct: i.battery().soc_min_pct,
                    soc_max_pct: i.battery().soc_max_pct,
                    step_w: i.rated_power_w / 1000.0,
                })
                .collect(),
        }
    }
}
