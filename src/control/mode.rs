//! Working modes (docs/design.md §5) as a concern: each narrows a unit's battery window and
//! says what the fleet should aim for.

use chrono::{DateTime, Utc};

use super::params::{ModeParams, TouWindow};
use super::UnitView;
use crate::config::{TouKind, WorkingMode};

/// What the mode asks of the batteries this cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeIntent {
    /// Name of the behaviour in force, for status (`self_consumption`, `tou_charge`, …).
    pub active: &'static str,
    /// Fleet battery power to aim for (+ discharge), for the units without a fixed target.
    pub fleet_target_w: f64,
    /// Per unit: a target that overrides the fleet share (back-up charging, plan steps).
    pub fixed_w: Vec<Option<f64>>,
}

/// The window in force at `now`, if any.
pub fn active_window(m: &ModeParams, now: DateTime<Utc>) -> Option<&TouWindow> {
    m.windows.iter().find(|w| w.window.contains(now, m.tz))
}

/// Apply the working mode: narrow each unit's `[lo, hi]` battery window in place and return
/// the intent. `self_use_w` is the fleet battery power that brings the grid to zero.
pub fn apply(
    m: &ModeParams,
    now: DateTime<Utc>,
    units: &mut [UnitView],
    self_use_w: f64,
    plan: Option<&[Option<f64>]>,
) -> ModeIntent {
    let mut fixed = vec![None; units.len()];
    match m.mode {
        WorkingMode::SelfConsumption => ModeIntent {
            active: "self_consumption",
            fleet_target_w: self_use_w,
            fixed_w: fixed,
        },
        WorkingMode::Plan => {
            let Some(plan) = plan else {
                return ModeIntent {
                    active: "self_consumption",
                    fleet_target_w: self_use_w,
                    fixed_w: fixed,
                };
            };
            for (k, u) in units.iter().enumerate() {
                if u.controllable {
                    fixed[k] = plan.get(k).copied().flatten();
                }
            }
            ModeIntent {
                active: "plan",
                fleet_target_w: self_use_w,
                fixed_w: fixed,
            }
        }
        WorkingMode::TimeOfUse => match active_window(m, now) {
            None => ModeIntent {
                active: "self_consumption",
                fleet_target_w: self_use_w,
                fixed_w: fixed,
            },
            Some(w) => {
                let mut total = 0.0;
                for u in units.iter_mut().filter(|u| u.controllable) {
                    match w.kind {
                        TouKind::Charge => {
                            u.hi = u.hi.min(0.0);
                            total += u.lo;
                        }
                        TouKind::Discharge => {
                            u.lo = u.lo.max(0.0);
                            total += u.hi;
                        }
                    }
                }
                match w.kind {
                    // Charge at the window's power, or take all of a larger surplus.
                    TouKind::Charge => ModeIntent {
                        active: "tou_charge",
                        fleet_target_w: (-w.power_w.unwrap_or(-total)).min(self_use_w),
                        fixed_w: fixed,
                    },
                    TouKind::Discharge => ModeIntent {
                        active: "tou_discharge",
                        fleet_target_w: w.power_w.unwrap_or(total).max(self_use_w),
                        fixed_w: fixed,
                    },
                }
            }
        },
        WorkingMode::Backup => {
            let reserve = m.reserve_soc_pct;
            let mut charging = false;
            for (k, u) in units.iter_mut().enumerate() {
                if !u.controllable {
                    continue;
                }
                if u.soc_pct < reserve {
                    // Below the reserve the battery only charges, from the grid if need be.
                    u.hi = u.hi.min(0.0);
                    fixed[k] = Some(u.lo);
                    charging = true;
                } else if u.soc_pct < reserve + 1.0 {
                    // At the reserve: no discharge (it would fall below), no forced charge.
                    u.hi = u.hi.min(0.0);
                }
            }
            if charging {
                // Never charge one battery from another.
                for (k, u) in units.iter_mut().enumerate() {
                    if fixed[k].is_none() {
                        u.hi = u.hi.min(0.0);
                    }
                }
            }
            ModeIntent {
                active: if charging { "backup_charge" } else { "backup" },
                fleet_target_w: self_use_w,
                fixed_w: fixed,
            }
        }
    }
}
