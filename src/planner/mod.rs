//! Time-of-use optimisation: the fleet's charge and discharge for the horizon ahead, against
//! import and export prices, within the grid connection's limits and each unit's ratings.
//!
//! The plan is an LP (`lp`) over classes of batteries that aggregate exactly (`classes`),
//! made executable where the LP alone is not — negative prices, export paying more than
//! import — by a branch and bound over directions (`exact`), then shared out and published
//! with every SOC following the published powers (`publish`).
//!
//! SOC bounds are hard while a battery starts inside them; a battery that starts outside
//! (below a raised reserve, say) gets penalised slack until it is back. A value on the energy
//! left at the end stops the plan from emptying the batteries at the horizon, and a small
//! cycling cost breaks ties against needless churn.

pub mod chart;
mod classes;
mod exact;
pub mod inputs;
mod lp;
mod publish;
pub mod pv_correction;
pub mod score;
pub mod series;
pub mod task;
pub mod weather;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use publish::solve;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Battery {
    pub id: String,
    pub capacity_wh: f64,
    pub max_charge_w: f64,
    pub max_discharge_w: f64,
    pub charge_efficiency: f64,
    pub discharge_efficiency: f64,
    pub soc_min_pct: f64,
    pub soc_max_pct: f64,
    /// At the start of the plan.
    pub soc_pct: f64,
    /// The unit's AC rating, shared by its battery and its own PV (`INFINITY`: not limited).
    pub rated_w: f64,
    /// Share of the site's PV forecast that comes through this unit (DC PV on a hybrid).
    pub pv_share: f64,
}

/// Where each input series came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sources {
    pub import_price: String,
    pub export_price: String,
    pub pv: String,
    pub load: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanInputs {
    pub start: DateTime<Utc>,
    pub step_s: f64,
    /// Per kWh, one per step.
    pub import_price: Vec<f64>,
    pub export_price: Vec<f64>,
    pub pv_w: Vec<f64>,
    pub load_w: Vec<f64>,
    pub batteries: Vec<Battery>,
    /// Sum over phases.
    pub export_limit_w: f64,
    pub import_limit_w: Option<f64>,
    /// Demand-response limits per step (export, import), W; empty or `None` where none.
    pub dr_limits_w: Vec<(Option<f64>, Option<f64>)>,
    /// Back-up reserve every battery keeps (soft).
    pub reserve_pct: f64,
    pub cycling_cost_per_kwh: f64,
    pub soc_penalty_per_kwh: f64,
    pub terminal_value_per_kwh: Option<f64>,
    pub time_limit_s: f64,
    pub sources: Sources,
    /// Where each step's PV forecast came from (`weather`, `clear_sky`, `csv`, `curve`);
    /// empty when not told.
    pub pv_from: Vec<&'static str>,
}

impl PlanInputs {
    pub fn steps(&self) -> usize {
        self.import_price.len()
    }

    /// Export allowed in step `t`: the site's limit, narrowed by demand response.
    pub fn export_cap_w(&self, t: usize) -> f64 {
        let dr = self.dr_limits_w.get(t).and_then(|l| l.0);
        dr.map_or(self.export_limit_w, |w| w.min(self.export_limit_w))
            .max(0.0)
    }

    /// Import allowed in step `t`, if limited.
    pub fn import_cap_w(&self, t: usize) -> Option<f64> {
        let dr = self.dr_limits_w.get(t).and_then(|l| l.1);
        match (self.import_limit_w, dr) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatteryStep {
    pub id: String,
    /// + discharge, − charge (AC side).
    pub power_w: f64,
    /// The unit's AC output: its own PV not curtailed, plus the battery (+ into the site).
    pub ac_w: f64,
    /// At the end of the step.
    pub soc_pct: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanStep {
    pub start: String,
    pub import_price: f64,
    pub export_price: f64,
    pub pv_w: f64,
    /// Where `pv_w` came from: `weather`, `clear_sky`, `csv` or `curve`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pv_source: Option<&'static str>,
    pub load_w: f64,
    /// + import.
    pub grid_w: f64,
    pub curtailed_w: f64,
    pub batteries: Vec<BatteryStep>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Energy cost of the plan (imports less exports at their prices).
    pub cost: f64,
    /// The same site without batteries.
    pub baseline_cost: f64,
    /// The LP's objective: cost, cycling cost and SOC penalties, less the value of the
    /// energy left at the end.
    pub objective: f64,
    /// How far the objective may be above the best executable plan's, at most (%).
    pub optimality_gap_pct: f64,
    /// LP solves the plan took: 1 when the LP alone was executable.
    pub lp_solves: usize,
    pub solve_ms: f64,
    pub step_s: f64,
    /// SOC bounds the plan could not keep (soft constraints), in words.
    pub violations: Vec<String>,
    pub sources: Sources,
    pub steps: Vec<PlanStep>,
}

impl Plan {
    /// The step containing `t`.
    pub fn step_at(&self, t: DateTime<Utc>) -> Option<&PlanStep> {
        let first = DateTime::parse_from_rfc3339(&self.steps.first()?.start)
            .ok()?
            .with_timezone(&Utc);
        let k = ((t - first).num_milliseconds() as f64 / 1000.0 / self.step_s).floor();
        if k < 0.0 {
            return None;
        }
        self.steps.get(k as usize)
    }

    /// Battery targets (+ discharge) per battery for the step containing `t`.
    pub fn targets_at(&self, t: DateTime<Utc>) -> Option<Vec<f64>> {
        let step = self.step_at(t)?;
        Some(step.batteries.iter().map(|b| b.power_w).collect())
    }

    /// Battery targets for the units `ids` (config order) for the step containing `t`: a
    /// unit without a battery in the plan (PV only) is given 0.
    pub fn targets_for(&self, t: DateTime<Utc>, ids: &[String]) -> Option<Vec<f64>> {
        let step = self.step_at(t)?;
        Some(
            ids.iter()
                .map(|id| {
                    step.batteries
                        .iter()
                        .find(|b| &b.id == id)
                        .map_or(0.0, |b| b.power_w)
                })
                .collect(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("bad planner inputs: {0}")]
    Inputs(String),
    #[error("the solver failed: {0}")]
    Solver(String),
    #[error("the solver ran past its {0} s limit")]
    Timeout(f64),
}

/// Cost of the site without batteries: PV serves the load, the rest is imported, surplus is
/// exported up to the limit (none at a negative export price) and curtailed beyond.
pub fn baseline_cost(i: &PlanInputs) -> f64 {
    let dt_h = i.step_s / 3600.0;
    (0..i.steps())
        .map(|t| {
            let net = i.load_w[t] - i.pv_w[t];
            if net >= 0.0 {
                i.import_price[t] * net * dt_h / 1000.0
            } else if i.export_price[t] > 0.0 {
                -i.export_price[t] * (-net).min(i.export_cap_w(t)) * dt_h / 1000.0
            } else {
                0.0
            }
        })
        .sum()
}

#[cfg(test)]
mod tests;
