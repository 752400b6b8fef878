//! Export and import limits at the grid connection (docs/design.md §4), in all three modes.
//!
//! The limits narrow what the dispatch asked for. Export is brought back in tiers —
//! batteries absorb before PV is curtailed, and single-phase units act on their own phase
//! before three-phase units act on all three — so an unbalanced site keeps every phase
//! inside its limit without cutting the whole fleet to "worst phase × 3".

use super::dispatch::reduce;
use super::params::GridLimit;
use super::UnitView;
use crate::config::Phase;

/// Headroom allowed at the connection after the margin: for the phase sum, or per phase
/// (`None` for a phase the grid does not have).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Allowance {
    Total(f64),
    Phase([Option<f64>; 3]),
}

impl Allowance {
    pub fn new(
        limit: GridLimit,
        phases: &[Phase],
        voltage_v: [f64; 3],
        margin_w: f64,
    ) -> Allowance {
        let per_phase = |w: &dyn Fn(usize) -> f64| {
            let mut a = [None; 3];
            for p in phases {
                a[p.index()] = Some(w(p.index()) - margin_w);
            }
            Allowance::Phase(a)
        };
        match limit {
            // A margin past a zero limit means a small import: that is the intent.
            GridLimit::Total(w) => Allowance::Total(w - margin_w),
            GridLimit::PhasePower(w) => per_phase(&|_| w),
            GridLimit::PhaseCurrent(a) => per_phase(&|k| a * voltage_v[k]),
        }
    }
}

/// Which constraint held the fleet back this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    ExportTotal,
    ExportPhase(Phase),
    ImportTotal,
    ImportPhase(Phase),
}

impl Binding {
    pub fn label(self) -> String {
        match self {
            Binding::ExportTotal => "export_limit".into(),
            Binding::ExportPhase(p) => format!("export_limit:{}", p.as_str()),
            Binding::ImportTotal => "import_limit".into(),
            Binding::ImportPhase(p) => format!("import_limit:{}", p.as_str()),
        }
    }

    pub fn is_export(self) -> bool {
        matches!(self, Binding::ExportTotal | Binding::ExportPhase(_))
    }

    /// The phase that bound, in the per-phase modes.
    pub fn phase(self) -> Option<Phase> {
        match self {
            Binding::ExportPhase(p) | Binding::ImportPhase(p) => Some(p),
            Binding::ExportTotal | Binding::ImportTotal => None,
        }
    }
}

/// Grid power per phase (+ import) if the controllable units produce what they are set to.
pub fn predict(units: &[UnitView], net_w: [f64; 3]) -> [f64; 3] {
    let mut g = net_w;
    for u in units.iter().filter(|u| u.controllable) {
        let out = u.pv_used_w + u.battery_w;
        for (k, g) in g.iter_mut().enumerate() {
            *g -= out * u.weight[k];
        }
    }
    g
}

/// Take back, through the output caps, export that the final setpoints would put over an
/// export `allowance`. Settling, the direction dwell and register steps move a battery off
/// what the limits LP planned, and the LP's plan sat at the allowance; a cap below a unit's
/// planned output has the firmware cut its PV (and then its discharge) to match. Units that
/// are held are left alone; the others give up output in proportion to what they deliver
/// (on the phase over, in the per-phase modes). Only caps fall.
pub fn trim_to_export(
    units: &mut [UnitView],
    caps_w: &mut [Option<f64>],
    net_w: [f64; 3],
    allowance: Allowance,
) {
    let (phase_over, total_over) = excess(predict(units, net_w), allowance, -1.0);
    let overs: Vec<(Option<usize>, f64)> = match allowance {
        Allowance::Total(_) => vec![(None, total_over)],
        Allowance::Phase(_) => (0..3).map(|k| (Some(k), phase_over[k])).collect(),
    };
    for (phase, over) in overs {
        if over <= 0.0 {
            continue;
        }
        let weight = |u: &UnitView| phase.map_or(1.0, |k| u.weight[k]);
        let gives = |u: &UnitView| u.controllable && !u.held;
        let out = |u: &UnitView| (u.pv_used_w + u.battery_w).max(0.0);
        let able: f64 = units
            .iter()
            .filter(|u| gives(u))
            .map(|u| out(u) * weight(u))
            .sum();
        if able <= 0.0 {
            continue;
        }
        let share = (over / able).min(1.0);
        for (u, cap) in units.iter_mut().zip(caps_w.iter_mut()) {
            if !gives(u) || weight(u) <= 0.0 {
                continue;
            }
            let to_w = out(u) * (1.0 - share);
            if let Some(c) = cap.as_mut() {
                *c = c.min(to_w);
            }
            // The firmware cuts PV first, then the discharge.
            u.battery_w = u.battery_w.min(to_w);
            u.pv_used_w = (to_w - u.battery_w).max(0.0).min(u.pv_used_w);
        }
    }
}

/// How far each phase (or the sum) is over `allowance` in the given direction
/// (`sign` = −1 for export, +1 for import).
fn excess(g: [f64; 3], allowance: Allowance, sign: f64) -> ([f64; 3], f64) {
    match allowance {
        Allowance::Total(x) => ([0.0; 3], sign * g.iter().sum::<f64>() - x),
        Allowance::Phase(xs) => {
            let mut e = [0.0; 3];
            for k in 0..3 {
                if let Some(x) = xs[k] {
                    e[k] = sign * g[k] - x;
                }
            }
            (e, 0.0)
        }
    }
}

const EPS_W: f64 = 0.5;

#[derive(Clone, Copy)]
enum Lever {
    /// Charge more / discharge less.
    Battery,
    /// Curtail PV.
    Curtail,
}

fn worst_phase(e: [f64; 3]) -> Phase {
    let k = (0..3).max_by(|&a, &b| e[a].total_cmp(&e[b])).unwrap_or(0);
    Phase::ALL[k]
}

/// Lower the fleet's output until export is within `allowance`. Returns the binding
/// constraint if export had to be held back.
pub fn hold_export(
    units: &mut [UnitView],
    net_w: [f64; 3],
    allowance: Allowance,
) -> Option<Binding> {
    let (e0, t0) = excess(predict(units, net_w), allowance, -1.0);
    let binding = match allowance {
        Allowance::Total(_) if t0 > EPS_W => Binding::ExportTotal,
        Allowance::Phase(_) if e0.iter().any(|&e| e > EPS_W) => {
            Binding::ExportPhase(worst_phase(e0))
        }
        _ => return None,
    };
    let controllable: Vec<usize> = (0..units.len())
        .filter(|&k| units[k].controllable)
        .collect();
    let single: Vec<usize> = controllable
        .iter()
        .copied()
        .filter(|&k| !units[k].three_phase)
        .collect();
    let three: Vec<usize> = controllable
        .iter()
        .copied()
        .filter(|&k| units[k].three_phase)
        .collect();

    for lever in [Lever::Battery, Lever::Curtail] {
        let room = move |u: &UnitView| match lever {
            Lever::Battery => u.battery_w - u.lo,
            Lever::Curtail => u.pv_used_w,
        };
        let take = move |u: &mut UnitView, x: f64| match lever {
            Lever::Battery => u.battery_w -= x,
            Lever::Curtail => u.pv_used_w -= x,
        };
        match allowance {
            Allowance::Total(_) => {
                let (_, t) = excess(predict(units, net_w), allowance, -1.0);
                reduce(units, &controllable, t, room, take);
            }
            Allowance::Phase(_) => {
                // A three-phase unit's change lands a third on each phase, so the phases are
                // settled one after another; a few rounds converge.
                for _ in 0..4 {
                    let (e, _) = excess(predict(units, net_w), allowance, -1.0);
                    if e.iter().all(|&x| x <= EPS_W) {
                        break;
                    }
                    for phase in Phase::ALL {
                        let need = e[phase.index()];
                        let on_phase: Vec<usize> = single
                            .iter()
                            .copied()
                            .filter(|&k| units[k].weight[phase.index()] > 0.0)
                            .collect();
                        reduce(units, &on_phase, need, room, take);
                    }
                    let (e, _) = excess(predict(units, net_w), allowance, -1.0);
                    let worst = e.iter().copied().fold(0.0, f64::max);
                    reduce(units, &three, 3.0 * worst, room, take);
                }
            }
        }
        let (e, t) = excess(predict(units, net_w), allowance, -1.0);
        if t <= EPS_W && e.iter().all(|&x| x <= EPS_W) {
            break;
        }
    }
    Some(binding)
}

/// Raise the fleet's output (less charge, more discharge) until import is within
/// `allowance`, as far as the batteries allow.
pub fn hold_import(
    units: &mut [UnitView],
    net_w: [f64; 3],
    allowance: Allowance,
) -> Option<Binding> {
    let (e0, t0) = excess(predict(units, net_w), allowance, 1.0);
    let binding = match allowance {
        Allowance::Total(_) if t0 > EPS_W => Binding::ImportTotal,
        Allowance::Phase(_) if e0.iter().any(|&e| e > EPS_W) => {
            Binding::ImportPhase(worst_phase(e0))
        }
        _ => return None,
    };
    let controllable: Vec<usize> = (0..units.len())
        .filter(|&k| units[k].controllable)
        .collect();
    let room = |u: &UnitView| u.hi - u.battery_w;
    let take = |u: &mut UnitView, x: f64| u.battery_w += x;
    match allowance {
        Allowance::Total(_) => {
            let (_, t) = excess(predict(units, net_w), allowance, 1.0);
            reduce(units, &controllable, t, room, take);
        }
        Allowance::Phase(_) => {
            for _ in 0..4 {
                let (e, _) = excess(predict(units, net_w), allowance, 1.0);
                for phase in Phase::ALL {
                    let on_phase: Vec<usize> = controllable
                        .iter()
                        .copied()
                        .filter(|&k| !units[k].three_phase && units[k].weight[phase.index()] > 0.0)
                        .collect();
                    reduce(units, &on_phase, e[phase.index()], room, take);
                }
                let (e, _) = excess(predict(units, net_w), allowance, 1.0);
                let worst = e.iter().copied().fold(0.0, f64::max);
                let three: Vec<usize> = controllable
                    .iter()
                    .copied()
                    .filter(|&k| units[k].three_phase)
                    .collect();
                reduce(units, &three, 3.0 * worst, room, take);
            }
        }
    }
    Some(binding)
}

/// What is left of the export allowance after the prediction, per unit: the unit's share
/// of the room its phases still have. Used to set output caps just above the plan.
pub fn residual_share(units: &[UnitView], net_w: [f64; 3], allowance: Allowance) -> Vec<f64> {
    let g = predict(units, net_w);
    let rated_on = |k: usize| -> f64 {
        units
            .iter()
            .filter(|u| u.controllable)
            .map(|u| u.rated_w * u.weight[k])
            .sum()
    };
    units
        .iter()
        .map(|u| {
            if !u.controllable {
                return 0.0;
            }
            match allowance {
                Allowance::Total(x) => {
                    let room = (x + g.iter().sum::<f64>()).max(0.0);
                    let total: f64 = units
                        .iter()
                        .filter(|u| u.controllable)
                        .map(|u| u.rated_w)
                        .sum();
                    if total > 0.0 {
                        room * u.rated_w / total
                    } else {
                        0.0
                    }
                }
                Allowance::Phase(xs) => {
                    let mut share = f64::INFINITY;
                    for k in 0..3 {
                        if u.weight[k] == 0.0 {
                            continue;
                        }
                        let room = xs[k].map_or(0.0, |x| (x + g[k]).max(0.0));
                        let on = rated_on(k);
                        let mine = if on > 0.0 {
                            room * u.rated_w * u.weight[k] / on
                        } else {
                            0.0
                        };
                        // Output spreads over the unit's phases: the tightest phase decides.
                        share = share.min(mine / u.weight[k]);
                    }
                    if share.is_finite() {
                        share
                    } else {
                        0.0
                    }
                }
            }
        })
        .collect()
}
