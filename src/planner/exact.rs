//! Plans a fleet can execute: branch and bound over directions, only where the LP needs it.
//!
//! The LP relaxation is exact while buying energy costs money and exporting pays less than
//! importing: then charging and discharging a battery at once, or importing and exporting
//! at once, only loses. With negative prices (consuming pays) or export paying more than
//! import, the relaxation burns energy in a battery's losses or trades with itself across
//! the meter — a plan no fleet can carry out, worth up to a percent more than any real one.
//!
//! So: solve the LP; where a battery or the grid goes both ways in a step, branch on that
//! one direction (charge only / discharge only; import only / export only) and solve again.
//! Every LP bounds the best executable plan below it; a repair (below) turns each LP into an
//! executable plan, bounding it above. The search stops when the best executable plan is
//! within `GAP` of the lowest open bound, so the published plan is within that of the
//! physical optimum.
//!
//! Good executable plans early make the search short, so three heuristics feed it: every LP
//! is repaired into a plan; from the root, two dives fix all conflicts at once and solve
//! again — one the way each step leans, one by error diffusion along each battery and the
//! grid (a run of half-import, half-export steps becomes import, export, import, ...: on a
//! day where export pays more than import that alone lands within 0.01 % of the optimum);
//! and the search plunges, following the child its flows lean to before it returns to the
//! lowest bound. It branches on the grid's direction first: one choice per step that settles
//! most of the fleet's. On a day with ordinary prices the first LP has no conflicts and is the
//! plan: no branching, no integer variables.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::classes::Class;
use super::lp::{
    grid_reach, objective, pv_elsewhere, pv_on, rating_binds, solve_fixed, Fixings, Flows, Way,
};
use super::{PlanError, PlanInputs};

/// Below this, a simultaneous flow is solver noise, not a conflict (W).
const CONFLICT_W: f64 = 1.0;
/// Relative optimality gap at which the search stops: a hundredth of a percent.
const GAP: f64 = 1e-4;
/// LP solves the search may spend before it publishes its best plan with the gap reached.
const MAX_SOLVES: usize = 400;

/// The plan found and how close to the optimum it is proven to be.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub flows: Flows,
    pub objective: f64,
    /// No executable plan has an objective below this.
    pub bound: f64,
    pub lp_solves: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Conflict {
    Battery { class: usize, step: usize },
    Grid { step: usize },
}

/// Where the solution goes both ways, largest first, with the direction the flows favour.
fn conflicts(f: &Flows) -> Vec<(f64, Conflict, Way)> {
    let mut out = Vec::new();
    for (k, (c, d)) in f.charge_w.iter().zip(&f.discharge_w).enumerate() {
        for t in 0..c.len() {
            let both = c[t].min(d[t]);
            if both >= CONFLICT_W {
                let way = if c[t] >= d[t] { Way::In } else { Way::Out };
                out.push((both, Conflict::Battery { class: k, step: t }, way));
            }
        }
    }
    for t in 0..f.import_w.len() {
        let both = f.import_w[t].min(f.export_w[t]);
        if both >= CONFLICT_W {
            let way = if f.import_w[t] >= f.export_w[t] {
                Way::In
            } else {
                Way::Out
            };
            out.push((both, Conflict::Grid { step: t }, way));
        }
    }
    // The grid's direction first: one choice per step that settles most of the fleet's.
    let is_battery = |c: &Conflict| matches!(c, Conflict::Battery { .. });
    out.sort_by(|a, b| {
        is_battery(&a.1)
            .cmp(&is_battery(&b.1))
            .then(b.0.total_cmp(&a.0))
    });
    out
}

fn fixed(fix: &Fixings, c: Conflict, way: Way) -> Fixings {
    let mut f = fix.clone();
    match c {
        Conflict::Battery { class, step } => f.battery[class][step] = Some(way),
        Conflict::Grid { step } => f.grid[step] = Some(way),
    }
    f
}

/// An executable plan from any LP solution, keeping every battery's energy trajectory: a
/// battery that charges and discharges in a step does only the net of it (the same energy
/// change, with less AC power), hybrids over their rating curtail their own PV, and the grid
/// takes the difference, one way, curtailing PV where export would pass its limit. `None`
/// when PV cannot be curtailed enough.
pub(super) fn repair(i: &PlanInputs, classes: &[Class], f: &Flows) -> Option<Flows> {
    let dt_h = i.step_s / 3600.0;
    let mut g = f.clone();
    for (k, cl) in classes.iter().enumerate() {
        for t in 0..i.steps() {
            let (c, d) = (g.charge_w[k][t], g.discharge_w[k][t]);
            if c > 0.0 && d > 0.0 {
                let stored_wh = (cl.eta_c * c - d / cl.eta_d) * dt_h;
                if stored_wh >= 0.0 {
                    g.charge_w[k][t] = stored_wh / cl.eta_c / dt_h;
                    g.discharge_w[k][t] = 0.0;
                } else {
                    g.charge_w[k][t] = 0.0;
                    g.discharge_w[k][t] = -stored_wh * cl.eta_d / dt_h;
                }
            }
            if rating_binds(i, cl, t) {
                let ac =
                    pv_on(i, cl, t) - g.curtail_w[k][t] + g.discharge_w[k][t] - g.charge_w[k][t];
                if ac > cl.rated_w {
                    g.curtail_w[k][t] += ac - cl.rated_w;
                    if g.curtail_w[k][t] > pv_on(i, cl, t) + CONFLICT_W {
                        return None;
                    }
                }
            }
        }
    }
    for t in 0..i.steps() {
        let net = |g: &Flows| {
            let mut n = i.load_w[t] - i.pv_w[t] + g.curtail_site_w[t];
            for k in 0..classes.len() {
                n += g.curtail_w[k][t] + g.charge_w[k][t] - g.discharge_w[k][t];
            }
            n
        };
        let mut over = -net(&g) - i.export_cap_w(t);
        if over > 0.0 {
            let room = pv_elsewhere(i, classes, t) - g.curtail_site_w[t];
            let take = over.min(room.max(0.0));
            g.curtail_site_w[t] += take;
            over -= take;
            for (k, cl) in classes.iter().enumerate() {
                let room = pv_on(i, cl, t) - g.curtail_w[k][t];
                let take = over.min(room.max(0.0));
                g.curtail_w[k][t] += take;
                over -= take;
            }
            if over > CONFLICT_W {
                return None;
            }
        }
        let n = net(&g);
        g.import_w[t] = n.max(0.0);
        g.export_w[t] = (-n).max(0.0);
        if i.import_cap_w(t).is_some_and(|cap| n > cap + CONFLICT_W) {
            return None;
        }
    }
    Some(g)
}

/// An open node: directions fixed and the LP's solution under them.
struct Node {
    bound: f64,
    fix: Fixings,
    flows: Flows,
}

impl PartialEq for Node {
    fn eq(&self, other: &Self) -> bool {
        self.bound.total_cmp(&other.bound) == Ordering::Equal
    }
}
impl Eq for Node {}
impl PartialOrd for Node {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Node {
    /// The heap pops the lowest bound first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.bound.total_cmp(&self.bound)
    }
}

struct Search<'a> {
    i: &'a PlanInputs,
    classes: &'a [Class],
    started: Instant,
    lp_solves: usize,
    best: Option<(f64, Flows)>,
}

impl Search<'_> {
    fn tolerance(&self) -> f64 {
        self.best
            .as_ref()
            .map_or(0.0, |(o, _)| GAP * o.abs().max(1e-3))
    }

    fn beats_best(&self, objective: f64) -> bool {
        self.best
            .as_ref()
            .is_none_or(|(b, _)| objective < *b - self.tolerance())
    }

    fn offer(&mut self, objective: f64, flows: Flows) {
        if self.best.as_ref().is_none_or(|(b, _)| objective < *b) {
            self.best = Some((objective, flows));
        }
    }

    fn solve(&mut self, fix: &Fixings) -> Result<Option<Flows>, PlanError> {
        let left = self.i.time_limit_s - self.started.elapsed().as_secs_f64();
        if left <= 0.0 {
            return Err(PlanError::Timeout(self.i.time_limit_s));
        }
        self.lp_solves += 1;
        solve_fixed(self.i, self.classes, fix, left)
    }

    /// Take an LP solution: executable as it is, or repaired into the best so far and kept
    /// open for branching.
    fn visit(&mut self, fix: Fixings, flows: Flows) -> Option<Node> {
        let bound = objective(self.i, self.classes, &flows);
        if conflicts(&flows).is_empty() {
            self.offer(bound, flows);
            return None;
        }
        if let Some(r) = repair(self.i, self.classes, &flows) {
            let o = objective(self.i, self.classes, &r);
            self.offer(o, r);
        }
        self.beats_best(bound).then_some(Node { bound, fix, flows })
    }

    /// Fix every conflict and solve again, a few times: a quick executable plan to prune
    /// against. Along each battery and the grid, conflicting steps take turns in and out in
    /// proportion to how far each went either way (error diffusion over time), so a run of
    /// half-charging, half-discharging steps becomes charge, discharge, charge, ...
    fn dive(&mut self, from: &Node, rounding: Rounding) -> Result<(), PlanError> {
        let mut fix = from.fix.clone();
        let mut flows = from.flows.clone();
        for _ in 0..4 {
            let found = conflicts(&flows);
            if found.is_empty() {
                break;
            }
            fix = match rounding {
                Rounding::Diffused => diffused(self.i, self.classes, &fix, &flows),
                Rounding::Lean => found
                    .into_iter()
                    .fold(fix, |fix, (_, c, way)| fixed(&fix, c, way)),
            };
            match self.solve(&fix)? {
                Some(f) => flows = f,
                None => return Ok(()),
            }
        }
        if conflicts(&flows).is_empty() {
            let o = objective(self.i, self.classes, &flows);
            self.offer(o, flows);
        }
        Ok(())
    }
}

/// How a dive fixes the conflicts it meets.
#[derive(Debug, Clone, Copy)]
enum Rounding {
    /// The way each step's flows lean.
    Lean,
    /// Turns in and out along each battery and the grid.
    Diffused,
}

/// Every conflict in `f` fixed by error diffusion along its battery or the grid.
fn diffused(i: &PlanInputs, classes: &[Class], fix: &Fixings, f: &Flows) -> Fixings {
    let mut out = fix.clone();
    let turn = |acc: &mut f64, inward: f64, outward: f64| {
        *acc += inward / (inward + outward);
        if *acc >= 0.5 {
            *acc -= 1.0;
            Way::In
        } else {
            Way::Out
        }
    };
    for (k, cl) in classes.iter().enumerate() {
        let mut acc = 0.0;
        for t in 0..i.steps() {
            let (c, d) = (f.charge_w[k][t], f.discharge_w[k][t]);
            if c.min(d) >= CONFLICT_W {
                out.battery[k][t] = Some(turn(&mut acc, c / cl.max_c_w, d / cl.max_d_w));
            }
        }
    }
    let mut acc = 0.0;
    for t in 0..i.steps() {
        let (imp, exp) = (f.import_w[t], f.export_w[t]);
        if imp.min(exp) >= CONFLICT_W {
            let (most_in, most_out) = grid_reach(i, classes, t);
            out.grid[t] = Some(turn(&mut acc, imp / most_in, exp / most_out));
        }
    }
    out
}

/// The best executable plan within `GAP` of the optimum, or the best found when the search
/// runs out of LP solves or time (its `bound` then says how far from the optimum it may be).
pub(super) fn search(i: &PlanInputs, classes: &[Class]) -> Result<Outcome, PlanError> {
    let mut s = Search {
        i,
        classes,
        started: Instant::now(),
        lp_solves: 0,
        best: None,
    };
    let root_fix = Fixings::none(classes.len(), i.steps());
    let root = s
        .solve(&root_fix)?
        .ok_or_else(|| PlanError::Solver("no plan meets the grid limits".into()))?;
    let mut open = BinaryHeap::new();
    // Out of time with a plan in hand: publish it with the bound reached, never nothing.
    let mut out_of_time = false;
    if conflicts(&root).is_empty() {
        let o = objective(i, classes, &root);
        s.offer(o, root);
    } else {
        // Not executable as it is: from here on, with the hull of the physical flows.
        let hull = Fixings {
            hull: true,
            ..root_fix
        };
        let root = s
            .solve(&hull)?
            .ok_or_else(|| PlanError::Solver("no plan meets the grid limits".into()))?;
        if let Some(node) = s.visit(hull, root) {
            for rounding in [Rounding::Diffused, Rounding::Lean] {
                match s.dive(&node, rounding) {
                    Err(PlanError::Timeout(_)) if s.best.is_some() => {
                        out_of_time = true;
                        break;
                    }
                    other => other?,
                }
            }
            open.push(node);
        }
    }
    // Plunge: follow the child the flows lean to while it stays open (a quick way down to
    // executable plans that prune the rest); otherwise take the lowest bound.
    let mut plunge: Option<Node> = None;
    while let Some(node) = plunge.take().or_else(|| open.pop()) {
        if out_of_time || !s.beats_best(node.bound) || s.lp_solves >= MAX_SOLVES {
            open.push(node);
            break;
        }
        let Some(&(_, conflict, way)) = conflicts(&node.flows).first() else {
            continue;
        };
        let other = if way == Way::In { Way::Out } else { Way::In };
        for w in [way, other] {
            let fix = fixed(&node.fix, conflict, w);
            let flows = match s.solve(&fix) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                // Out of time: publish the best found with the bound reached.
                Err(PlanError::Timeout(_)) if s.best.is_some() => {
                    out_of_time = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            if let Some(child) = s.visit(fix, flows) {
                if w == way && plunge.is_none() {
                    plunge = Some(child);
                } else {
                    open.push(child);
                }
            }
        }
        if out_of_time {
            open.push(node);
            open.extend(plunge.take());
        }
    }
    open.extend(plunge.take());
    let lp_solves = s.lp_solves;
    let lowest_open = open.peek().map(|n| n.bound);
    let (objective, flows) = s
        .best
        .ok_or_else(|| PlanError::Solver("no executable plan found".into()))?;
    Ok(Outcome {
        bound: lowest_open.map_or(objective, |b| b.min(objective)),
        objective,
        flows,
        lp_solves,
    })
}
