//! What narrows the fleet this cycle, gathered into one typed set before [`super::step`]:
//! the site's export and import limits, the limits and targets demand response puts on top,
//! and the plan's targets. `step` reads the set and never asks where a limit came from by
//! comparing names; what held the fleet back comes out as a typed [`Binding`].

use serde::{Serialize, Serializer};

use super::params::{ControlParams, GridLimit};
use crate::config::Phase;
use crate::dr::DrConstraints;

/// Who set a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The site file (the grid connection agreement).
    Site,
    /// A demand-response event, contact or fallback in force.
    DemandResponse,
}

/// A limit at the grid connection and who set it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridCap {
    pub source: Source,
    pub limit: GridLimit,
}

/// A fleet target that replaces the working mode's (demand response).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FleetTarget {
    /// The fleet's batteries at this power, + discharge.
    BatteryW(f64),
    /// Grid power held at this value, + import.
    GridW(f64),
}

/// Everything that narrows the fleet this cycle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    /// Export limits, all held at once (the strictest binds).
    pub export: Vec<GridCap>,
    pub import: Vec<GridCap>,
    /// Each unit's output at most this share of its rating (DRM5–7).
    pub generation_pct: Option<f64>,
    /// Each unit's consumption at most this share of its rating (DRM1–3).
    pub consumption_pct: Option<f64>,
    /// DRM0: every unit in standby.
    pub standby: bool,
    pub fleet_target: Option<FleetTarget>,
    /// Plan-mode battery targets per unit (+ discharge), when a plan is in force.
    pub plan: Option<Vec<Option<f64>>>,
    /// The wiring check's battery target for every unit (+ discharge), while it runs: it
    /// replaces the working mode; the limits still hold.
    pub commissioning: Option<Vec<f64>>,
}

impl Constraints {
    /// The site's limits from `p`, demand response's from `dr`, and the plan's targets.
    pub fn gather(
        p: &ControlParams,
        dr: &DrConstraints,
        plan: Option<Vec<Option<f64>>>,
    ) -> Constraints {
        let site = |limit| GridCap {
            source: Source::Site,
            limit,
        };
        let dr_cap = |w: Option<f64>| {
            w.map(|w| GridCap {
                source: Source::DemandResponse,
                limit: GridLimit::Total(w),
            })
        };
        let export = std::iter::once(site(p.export))
            .chain(dr_cap(dr.export_limit_w))
            .collect();
        let import = p
            .import
            .map(site)
            .into_iter()
            .chain(dr_cap(dr.import_limit_w))
            .collect();
        let fleet_target = match (dr.fleet_battery_w, dr.grid_target_w) {
            (Some(w), _) => Some(FleetTarget::BatteryW(w)),
            (None, Some(w)) => Some(FleetTarget::GridW(w)),
            (None, None) => None,
        };
        Constraints {
            export,
            import,
            generation_pct: dr.generation_pct,
            consumption_pct: dr.consumption_pct,
            standby: dr.standby,
            fleet_target,
            plan,
            commissioning: None,
        }
    }

    /// Whether demand response narrows the fleet now.
    pub fn dr_in_force(&self) -> bool {
        self.export
            .iter()
            .chain(&self.import)
            .any(|c| c.source == Source::DemandResponse)
            || self.generation_pct.is_some()
            || self.consumption_pct.is_some()
            || self.standby
            || self.fleet_target.is_some()
    }
}

/// What held the fleet back this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// An export limit; `phase` in the per-phase modes.
    Export {
        source: Source,
        phase: Option<Phase>,
    },
    Import {
        source: Source,
        phase: Option<Phase>,
    },
    /// An export and an import limit cannot both be met; `control.conflict_priority` says
    /// which holds.
    Conflict { export_holds: bool },
    /// A battery at its SOC bound.
    Soc,
    /// The grid meter is lost: every unit in the safe state.
    FailSafe,
    /// DRM0: every unit in standby.
    Standby,
}

impl Binding {
    /// The name in status and metrics: `export_limit`, `export_limit:L2`, `import_limit`,
    /// `dr:export_limit`, `dr:import_limit`, `conflict:export_holds`, `conflict:import_holds`,
    /// `soc`, `fail_safe`, `dr:drm0`.
    pub fn label(&self) -> String {
        let limit = |what: &str, source: &Source, phase: &Option<Phase>| {
            let prefix = match source {
                Source::Site => "",
                Source::DemandResponse => "dr:",
            };
            match phase {
                Some(p) => format!("{prefix}{what}:{}", p.as_str()),
                None => format!("{prefix}{what}"),
            }
        };
        match self {
            Binding::Export { source, phase } => limit("export_limit", source, phase),
            Binding::Import { source, phase } => limit("import_limit", source, phase),
            Binding::Conflict { export_holds: true } => "conflict:export_holds".into(),
            Binding::Conflict {
                export_holds: false,
            } => "conflict:import_holds".into(),
            Binding::Soc => "soc".into(),
            Binding::FailSafe => "fail_safe".into(),
            Binding::Standby => "dr:drm0".into(),
        }
    }

    pub fn is_export(&self) -> bool {
        matches!(self, Binding::Export { .. })
    }
}

impl Serialize for Binding {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}
