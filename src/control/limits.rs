//! Every export and import limit at the grid connection held at once (docs/design.md §4), by one
//! small exact solve per cycle.
//!
//! Fixing the limits one at a time goes wrong on real sites: raising discharge for an
//! import excess on one phase pushes a three-phase unit's other phases over their export
//! limit, and greedy per-phase tiers curtail a single-phase unit that a three-phase unit's
//! curtailment would have covered anyway. So when the dispatched fleet would break any
//! limit, one LP over the units and phases finds the nearest setpoints that break none:
//!
//! - variables per unit: battery power `b` (within its window) and PV used `q` (at most what
//!   the unit has), with `−rated ≤ q + b ≤ output cap`; a held (faulted, not following) unit's
//!   battery is what it measures, only its PV can be cut;
//! - per limit row (the sum of phases, or one phase): grid power within the allowance, with
//!   a slack that is priced, so the solve always has an answer;
//! - cost, in strict order: slack of the limits that hold in a conflict
//!   (`control.conflict_priority`), slack of the others, PV curtailed, battery moved away
//!   from the dispatch.
//!
//! All batteries keep one direction (never one charging from another): the solve runs with
//! all batteries at or above zero and at or below zero, and the cheaper answer wins — the
//! second only when the first has to curtail or break a limit. At most ten units and three
//! phases: ~40 variables, well under a millisecond with Clarabel.
//!
//! Most cycles need no solve: when the greedy tiers of [`super::grid_limit`] meet every
//! limit by moving batteries alone, nothing the LP ranks first could be better, and their
//! answer stands. The tiers also hold the limits in a cycle in which the solver fails.

use good_lp::{variable, Expression, ProblemVariables, Solution, SolverModel, Variable};

use super::constraints::{Binding, Source};
use super::grid_limit::{self, Allowance};
use super::UnitView;
use crate::config::{ConflictPriority, Phase};

/// One limit in force at the connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub source: Source,
    pub export: bool,
    pub allowance: Allowance,
}

/// A limit as one row: the phases it sums and the headroom.
#[derive(Debug, Clone, Copy)]
struct Row {
    source: Source,
    export: bool,
    phase: Option<Phase>,
    on: [f64; 3],
    allowance_w: f64,
}

impl Row {
    /// How far `grid_w` (+ import, per phase) is beyond this row's allowance.
    fn excess(&self, grid_w: [f64; 3]) -> f64 {
        let sum: f64 = (0..3).map(|k| self.on[k] * grid_w[k]).sum();
        let sign = if self.export { -1.0 } else { 1.0 };
        sign * sum - self.allowance_w
    }
}

fn rows(limits: &[Limit]) -> Vec<Row> {
    let mut rows = Vec::new();
    for l in limits {
        match l.allowance {
            Allowance::Total(x) => rows.push(Row {
                source: l.source,
                export: l.export,
                phase: None,
                on: [1.0; 3],
                allowance_w: x,
            }),
            Allowance::Phase(xs) => {
                for phase in Phase::ALL {
                    if let Some(x) = xs[phase.index()] {
                        let mut on = [0.0; 3];
                        on[phase.index()] = 1.0;
                        rows.push(Row {
                            source: l.source,
                            export: l.export,
                            phase: Some(phase),
                            on,
                            allowance_w: x,
                        });
                    }
                }
            }
        }
    }
    rows
}

/// Below this, a limit counts as met (W).
const EPS_W: f64 = 0.5;
/// The LP works in kW: coefficients near 1 suit an interior-point solver.
const K: f64 = 1000.0;
/// Costs per kW, far enough apart that each tier outweighs everything below it even when a
/// three-phase unit moves a third of the power on one phase.
const COST_HOLDS: f64 = 1.0e4;
const COST_YIELDS: f64 = 1.0e2;
const COST_CURTAIL: f64 = 10.0;
const COST_MOVE: f64 = 1.0;

/// Bring the fleet within every limit in `limits`, changing `units` (battery power and PV
/// used) as little as the cost order allows. `out_max_w` is each unit's highest AC output
/// (its rating, or a demand-response share of it). Returns what bound, `None` when the
/// dispatch already met every limit.
pub fn hold(
    units: &mut [UnitView],
    net_w: [f64; 3],
    limits: &[Limit],
    priority: ConflictPriority,
    out_max_w: &[f64],
) -> Option<Binding> {
    let rows = rows(limits);
    let before = grid_limit::predict(units, net_w);
    let broken: Vec<&Row> = rows.iter().filter(|r| r.excess(before) > EPS_W).collect();
    let first = first_binding(&broken, before)?;
    if batteries_alone(units, net_w, limits, &rows, out_max_w) {
        return Some(first);
    }

    let holds_export = priority == ConflictPriority::Export;
    let sigma = first_direction(units, &broken);
    let mut best: Option<Solved> = None;
    for direction in [sigma, -sigma] {
        if let Some(s) = solve(units, net_w, &rows, holds_export, out_max_w, direction) {
            let done = s.slack_w < EPS_W && s.curtail_w < EPS_W;
            if best.as_ref().is_none_or(|b| s.cost < b.cost) {
                best = Some(s);
            }
            if done {
                break;
            }
        }
    }
    let Some(best) = best else {
        tracing::warn!("the limits solve failed; holding the limits tier by tier");
        fallback(units, net_w, limits);
        return Some(first);
    };
    for (u, (b, q)) in units.iter_mut().zip(best.values) {
        u.battery_w = b;
        u.pv_used_w = q;
    }

    let after = grid_limit::predict(units, net_w);
    let at = |export: bool| {
        rows.iter()
            .any(|r| r.export == export && r.excess(after) > -EPS_W)
    };
    let short = |export: bool| {
        rows.iter()
            .any(|r| r.export == export && r.excess(after) > EPS_W)
    };
    // Both directions at their limit and the yielding one beyond it: a conflict.
    if at(true) && at(false) && short(!holds_export) {
        return Some(Binding::Conflict {
            export_holds: holds_export,
        });
    }
    Some(first)
}

/// The limit to report, `None` when none is broken: demand response's before the site's,
/// export before import, the largest excess first.
fn first_binding(broken: &[&Row], grid_w: [f64; 3]) -> Option<Binding> {
    let top = broken.iter().max_by(|a, b| {
        let rank = |r: &Row| (r.source == Source::DemandResponse, r.export);
        rank(a)
            .cmp(&rank(b))
            .then(a.excess(grid_w).total_cmp(&b.excess(grid_w)))
    })?;
    Some(if top.export {
        Binding::Export {
            source: top.source,
            phase: top.phase,
        }
    } else {
        Binding::Import {
            source: top.source,
            phase: top.phase,
        }
    })
}

/// Most cycles need only the batteries to move a little (the margin at a 0 W limit, a small
/// surplus): the tiers settle that in microseconds. When their answer meets every limit
/// without curtailing, keeps held units as they are, every battery one way and every output
/// within its cap, the LP could do no better on anything it ranks above battery movement,
/// so it is taken (into `units`) and the LP is skipped.
fn batteries_alone(
    units: &mut [UnitView],
    net_w: [f64; 3],
    limits: &[Limit],
    rows: &[Row],
    out_max_w: &[f64],
) -> bool {
    let mut tried = units.to_vec();
    fallback(&mut tried, net_w, limits);
    let after = grid_limit::predict(&tried, net_w);
    if rows.iter().any(|r| r.excess(after) > EPS_W) {
        return false;
    }
    let mut directions = 0u8;
    for (k, (u, t)) in units.iter().zip(&tried).enumerate() {
        if !u.controllable {
            continue;
        }
        let curtailed = t.pv_used_w < u.pv_used_w - EPS_W;
        let held_moved = u.held && (t.battery_w - u.battery_w).abs() > EPS_W;
        let over_cap =
            t.pv_used_w + t.battery_w > out_max_w.get(k).copied().unwrap_or(t.rated_w) + EPS_W;
        if curtailed || held_moved || over_cap {
            return false;
        }
        if !u.held && t.battery_w.abs() > EPS_W {
            directions |= if t.battery_w > 0.0 { 1 } else { 2 };
        }
    }
    if directions == 3 {
        return false;
    }
    units.clone_from_slice(&tried);
    true
}

/// The batteries' direction to try first: the dispatch's, or towards charge when only export
/// limits are broken and towards discharge when only import limits are.
fn first_direction(units: &[UnitView], broken: &[&Row]) -> f64 {
    let total: f64 = units
        .iter()
        .filter(|u| u.controllable && !u.held)
        .map(|u| u.battery_w)
        .sum();
    let towards_charge = if total.abs() > EPS_W {
        total < 0.0
    } else {
        broken.iter().all(|r| r.export)
    };
    if towards_charge {
        -1.0
    } else {
        1.0
    }
}

struct Solved {
    cost: f64,
    slack_w: f64,
    curtail_w: f64,
    /// Per unit: battery power and PV used, W.
    values: Vec<(f64, f64)>,
}

/// A unit's variables: battery (or its fixed power) and PV used.
enum Battery {
    Fixed(f64),
    Free {
        b: Variable,
        up: Variable,
        down: Variable,
    },
}

/// One solve with every free battery at or above zero (`direction` > 0) or at or below it.
/// `None` when the windows exclude that direction or the solver fails.
fn solve(
    units: &[UnitView],
    net_w: [f64; 3],
    rows: &[Row],
    holds_export: bool,
    out_max_w: &[f64],
    direction: f64,
) -> Option<Solved> {
    let mut vars = ProblemVariables::new();
    let mut battery = Vec::with_capacity(units.len());
    let mut pv = Vec::with_capacity(units.len());
    let mut objective = Expression::from(0.0);
    for (k, u) in units.iter().enumerate() {
        if !u.controllable {
            battery.push(None);
            pv.push(None);
            continue;
        }
        let out_max = out_max_w.get(k).copied().unwrap_or(u.rated_w);
        let bat = if u.held {
            Battery::Fixed(u.battery_w)
        } else {
            let (mut lo, mut hi) = (u.lo.min(u.hi), u.hi.max(u.lo));
            if direction > 0.0 {
                lo = lo.max(0.0);
            } else {
                hi = hi.min(0.0);
            }
            if lo > hi + 1e-9 {
                return None;
            }
            let b = vars.add(variable().min(lo / K).max(hi / K));
            let up = vars.add(variable().min(0.0));
            let down = vars.add(variable().min(0.0));
            objective += COST_MOVE * (up + down);
            Battery::Free { b, up, down }
        };
        let q_max = match bat {
            Battery::Fixed(b) => u.pv_used_w.min(out_max - b).max(0.0),
            Battery::Free { .. } => u.pv_used_w.max(0.0),
        };
        let q = vars.add(variable().min(0.0).max(q_max / K));
        objective += COST_CURTAIL * (q_max / K - q);
        battery.push(Some(bat));
        pv.push(Some((q, q_max)));
    }
    let slack: Vec<Variable> = rows
        .iter()
        .map(|r| {
            let s = vars.add(variable().min(0.0));
            let holds = r.export == holds_export;
            objective += if holds { COST_HOLDS } else { COST_YIELDS } * s;
            s
        })
        .collect();

    let mut problem = vars
        .minimise(objective.clone())
        .using(good_lp::solvers::clarabel::clarabel);
    // The AC output of each unit, kW.
    let mut output: Vec<Option<Expression>> = Vec::with_capacity(units.len());
    for (k, u) in units.iter().enumerate() {
        let (Some(bat), Some((q, _))) = (&battery[k], &pv[k]) else {
            output.push(None);
            continue;
        };
        let out = match bat {
            Battery::Fixed(b) => Expression::from(*q) + *b / K,
            Battery::Free { b, up, down } => {
                problem = problem.with((Expression::from(*b) - *up + *down).eq(u.battery_w / K));
                let out = Expression::from(*q) + *b;
                let out_max = out_max_w.get(k).copied().unwrap_or(u.rated_w);
                problem = problem
                    .with(out.clone().leq(out_max.max(0.0) / K))
                    .with(out.clone().geq(-u.rated_w / K));
                out
            }
        };
        output.push(Some(out));
    }
    for (r, s) in rows.iter().zip(&slack) {
        // Grid on the row's phases = net − Σ weight × output.
        let net: f64 = (0..3).map(|k| r.on[k] * net_w[k]).sum();
        let mut delivered = Expression::from(0.0);
        for (u, out) in units.iter().zip(&output) {
            if let Some(out) = out {
                let w: f64 = (0..3).map(|k| r.on[k] * u.weight[k]).sum();
                if w > 0.0 {
                    delivered += w * out.clone();
                }
            }
        }
        // Export: −(net − delivered) ≤ x + s. Import: net − delivered ≤ x + s.
        problem = if r.export {
            problem.with((delivered - *s).leq((r.allowance_w + net) / K))
        } else {
            problem.with((delivered + *s).geq((net - r.allowance_w) / K))
        };
    }
    let solution = problem.solve().ok()?;

    let mut values = Vec::with_capacity(units.len());
    let mut curtail_w = 0.0;
    for (k, u) in units.iter().enumerate() {
        let b = match &battery[k] {
            None => u.battery_w,
            Some(Battery::Fixed(b)) => *b,
            Some(Battery::Free { b, .. }) => {
                let lo = u.lo.min(u.hi);
                let hi = u.hi.max(u.lo);
                snap(solution.value(*b) * K).clamp(lo, hi)
            }
        };
        let q = match pv[k] {
            None => u.pv_used_w,
            Some((q, q_max)) => {
                let q = snap(solution.value(q) * K).clamp(0.0, q_max);
                curtail_w += q_max - q;
                q
            }
        };
        values.push((b, q));
    }
    let slack_w = slack.iter().map(|s| solution.value(*s).max(0.0) * K).sum();
    let cost = solution.eval(&objective);
    Some(Solved {
        cost,
        slack_w,
        curtail_w,
        values,
    })
}

/// An interior-point answer sits a hair inside its bounds: round to whole milliwatts.
fn snap(w: f64) -> f64 {
    (w * 1000.0).round() / 1000.0
}

/// The greedy tiers, limit by limit: the cheap path, and the answer in a cycle in which the
/// solver gave none.
fn fallback(units: &mut [UnitView], net_w: [f64; 3], limits: &[Limit]) {
    for l in limits {
        if l.export {
            grid_limit::hold_export(units, net_w, l.allowance);
        } else {
            grid_limit::hold_import(units, net_w, l.allowance);
        }
    }
}
