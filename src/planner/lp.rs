//! The planning LP for one set of direction choices, built with good_lp and solved with
//! Clarabel.
//!
//! Per class and step: charge `c`, discharge `d` (AC side) and the energy stored `e` at the
//! step's end; per step: import, export and curtailed PV (at each hybrid, and of the rest).
//! The relaxation lets a battery charge and discharge at once and the site import and export
//! at once; `exact` forbids that where it pays, by fixing directions (`Fixings`).

use good_lp::{variable, variables, Expression, ResolutionError, Solution, SolverModel, Variable};

use super::classes::Class;
use super::{PlanError, PlanInputs};

#[cfg(not(feature = "solver-clarabel"))]
compile_error!("the planner needs an LP solver: enable the `solver-clarabel` feature");

/// The solver behind the planner, chosen by Cargo feature, with its time limit set.
#[cfg(feature = "solver-clarabel")]
fn solver(
    vars: good_lp::ProblemVariables,
    objective: Expression,
    time_limit_s: f64,
) -> good_lp::solvers::clarabel::ClarabelProblem {
    let mut problem = vars
        .minimise(objective)
        .using(good_lp::solvers::clarabel::clarabel);
    // Iterative refinement of each KKT solve costs a third of the solve time on these
    // well-scaled kW/kWh LPs and changed no objective in the bench or the tests (all
    // checked against independent optima).
    problem
        .settings()
        .time_limit(time_limit_s.max(0.001))
        .iterative_refinement_enable(false);
    problem
}

/// The LP works in kW and kWh: watts against prices per kWh spread the coefficients over
/// nine orders of magnitude, which an interior-point solver resolves poorly.
pub(super) const K: f64 = 1000.0;

/// Per kWh moved through the grid or a battery: breaks ties between plans of equal cost
/// towards the one that moves least, so the solver does not return a battery charging and
/// discharging (or the site importing and exporting) where nothing is gained by it. A
/// millionth of a currency unit per kWh changes no plan's cost measurably.
const TIE_BREAK_PER_KWH: f64 = 1e-6;

/// Which way a battery or the grid connection may go in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    /// Battery charges only / site imports only.
    In,
    /// Battery discharges only / site exports only.
    Out,
}

/// Directions fixed so far: per class and step, and per step for the grid.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Fixings {
    pub battery: Vec<Vec<Option<Way>>>,
    pub grid: Vec<Option<Way>>,
    /// Add the convex hull of each step's physical flows (`c/C + d/D ≤ 1`, the same for
    /// import and export): valid for every executable plan, and a much tighter bound for
    /// the branching than the plain relaxation.
    pub hull: bool,
}

impl Fixings {
    pub(super) fn none(classes: usize, steps: usize) -> Fixings {
        Fixings {
            battery: vec![vec![None; steps]; classes],
            grid: vec![None; steps],
            hull: false,
        }
    }
}

/// A solution in W and Wh, per class (`[class][step]`) and per step.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Flows {
    pub import_w: Vec<f64>,
    pub export_w: Vec<f64>,
    /// PV curtailed outside the hybrids (AC-coupled PV).
    pub curtail_site_w: Vec<f64>,
    /// PV curtailed at each class's hybrids.
    pub curtail_w: Vec<Vec<f64>>,
    pub charge_w: Vec<Vec<f64>>,
    pub discharge_w: Vec<Vec<f64>>,
    pub energy_wh: Vec<Vec<f64>>,
    /// Energy below the floor / above the maximum (soft bounds), Wh.
    pub below_wh: Vec<Vec<f64>>,
    pub above_wh: Vec<Vec<f64>>,
}

/// PV forecast on a class's hybrids in step `t`.
pub(super) fn pv_on(i: &PlanInputs, c: &Class, t: usize) -> f64 {
    i.pv_w[t] * c.pv_share
}

/// PV outside the hybrids.
pub(super) fn pv_elsewhere(i: &PlanInputs, classes: &[Class], t: usize) -> f64 {
    let on: f64 = classes.iter().map(|c| c.pv_share).sum();
    i.pv_w[t] * (1.0 - on).max(0.0)
}

/// The most the site can import and export in step `t` (W): load plus every battery
/// charging, or PV plus every battery discharging less the load, within the grid limits.
pub(super) fn grid_reach(i: &PlanInputs, classes: &[Class], t: usize) -> (f64, f64) {
    let max_c: f64 = classes.iter().map(|c| c.max_c_w).sum();
    let max_d: f64 = classes.iter().map(|c| c.max_d_w).sum();
    let most_in = (i.load_w[t] + max_c).min(i.import_cap_w(t).unwrap_or(f64::INFINITY));
    let most_out = (i.pv_w[t] + max_d - i.load_w[t]).min(i.export_cap_w(t));
    (most_in, most_out)
}

/// Whether a class's AC rating can bind in step `t`: PV and full discharge above it.
pub(super) fn rating_binds(i: &PlanInputs, c: &Class, t: usize) -> bool {
    c.rated_w.is_finite() && pv_on(i, c, t) + c.max_d_w > c.rated_w
}

/// The value of the energy left at the end, per kWh, for a class.
pub(super) fn terminal_value(i: &PlanInputs, c: &Class) -> f64 {
    let mean_import = i.import_price.iter().sum::<f64>() / i.steps().max(1) as f64;
    i.terminal_value_per_kwh.unwrap_or(mean_import * c.eta_d)
}

/// The objective of a solution: energy cost, cycling cost, SOC penalties and tie-breaks,
/// less the value of the energy left. The same sum the LP minimises, so a repaired
/// solution and an LP's can be compared.
pub(super) fn objective(i: &PlanInputs, classes: &[Class], f: &Flows) -> f64 {
    let dt_h = i.step_s / 3600.0;
    let n = i.steps();
    let mut total = 0.0;
    for t in 0..n {
        let (imp, exp) = (f.import_w[t] / K, f.export_w[t] / K);
        total += (i.import_price[t] * imp - i.export_price[t] * exp) * dt_h;
        total += TIE_BREAK_PER_KWH * (imp + exp) * dt_h;
    }
    for (k, c) in classes.iter().enumerate() {
        for t in 0..n {
            let moved = (f.charge_w[k][t] + f.discharge_w[k][t]) / K;
            total += (i.cycling_cost_per_kwh + TIE_BREAK_PER_KWH) * moved * dt_h;
            total += i.soc_penalty_per_kwh * (f.below_wh[k][t] + f.above_wh[k][t]) / K;
        }
        total -= terminal_value(i, c) * f.energy_wh[k][n - 1] / K;
    }
    total
}

struct Vars {
    imp: Vec<Variable>,
    exp: Vec<Variable>,
    cur_site: Vec<Variable>,
    /// Only for classes with PV on them.
    cur: Vec<Option<Vec<Variable>>>,
    c: Vec<Vec<Variable>>,
    d: Vec<Vec<Variable>>,
    e: Vec<Vec<Variable>>,
    /// Only for classes that start outside their bounds.
    slack: Vec<Option<(Vec<Variable>, Vec<Variable>)>>,
}

fn upper(fixed: Option<Way>, blocked: Way, cap: f64) -> f64 {
    if fixed == Some(blocked) {
        0.0
    } else {
        cap
    }
}

fn add_vars(
    vars: &mut good_lp::ProblemVariables,
    i: &PlanInputs,
    classes: &[Class],
    fix: &Fixings,
) -> Vars {
    let n = i.steps();
    let add = |vars: &mut good_lp::ProblemVariables, hi: f64| vars.add(variable().min(0.0).max(hi));
    let imp = (0..n)
        .map(|t| {
            let cap = i.import_cap_w(t).map_or(f64::INFINITY, |w| w.max(0.0) / K);
            add(vars, upper(fix.grid[t], Way::Out, cap))
        })
        .collect();
    let exp = (0..n)
        .map(|t| add(vars, upper(fix.grid[t], Way::In, i.export_cap_w(t) / K)))
        .collect();
    let cur_site = (0..n)
        .map(|t| add(vars, pv_elsewhere(i, classes, t) / K))
        .collect();
    let mut v = Vars {
        imp,
        exp,
        cur_site,
        cur: Vec::new(),
        c: Vec::new(),
        d: Vec::new(),
        e: Vec::new(),
        slack: Vec::new(),
    };
    for (k, cl) in classes.iter().enumerate() {
        let f = &fix.battery[k];
        v.cur.push(
            (cl.pv_share > 0.0).then(|| (0..n).map(|t| add(vars, pv_on(i, cl, t) / K)).collect()),
        );
        v.c.push(
            (0..n)
                .map(|t| add(vars, upper(f[t], Way::Out, cl.max_c_w / K)))
                .collect(),
        );
        v.d.push(
            (0..n)
                .map(|t| add(vars, upper(f[t], Way::In, cl.max_d_w / K)))
                .collect(),
        );
        if cl.bounds_hold_at_start() {
            v.e.push(
                (0..n)
                    .map(|_| vars.add(variable().min(cl.lo_wh / K).max(cl.hi_wh / K)))
                    .collect(),
            );
            v.slack.push(None);
        } else {
            v.e.push((0..n).map(|_| add(vars, cl.cap_wh / K)).collect());
            let lo = (0..n).map(|_| vars.add(variable().min(0.0))).collect();
            let hi = (0..n).map(|_| vars.add(variable().min(0.0))).collect();
            v.slack.push(Some((lo, hi)));
        }
    }
    v
}

fn lp_objective(i: &PlanInputs, classes: &[Class], v: &Vars) -> Expression {
    let dt_h = i.step_s / 3600.0;
    let n = i.steps();
    let mut objective = Expression::with_capacity(n * (2 + 2 * classes.len()) + classes.len());
    for t in 0..n {
        objective.add_mul((i.import_price[t] + TIE_BREAK_PER_KWH) * dt_h, v.imp[t]);
        objective.add_mul((TIE_BREAK_PER_KWH - i.export_price[t]) * dt_h, v.exp[t]);
    }
    for (k, c) in classes.iter().enumerate() {
        let per_kwh = (i.cycling_cost_per_kwh + TIE_BREAK_PER_KWH) * dt_h;
        for t in 0..n {
            objective.add_mul(per_kwh, v.c[k][t]);
            objective.add_mul(per_kwh, v.d[k][t]);
        }
        if let Some((lo, hi)) = &v.slack[k] {
            for t in 0..n {
                objective.add_mul(i.soc_penalty_per_kwh, lo[t]);
                objective.add_mul(i.soc_penalty_per_kwh, hi[t]);
            }
        }
        objective.add_mul(-terminal_value(i, c), v.e[k][n - 1]);
    }
    objective
}

/// Solve the LP with the directions in `fix`. `Ok(None)` when those directions leave no
/// feasible plan.
pub(super) fn solve_fixed(
    i: &PlanInputs,
    classes: &[Class],
    fix: &Fixings,
    time_limit_s: f64,
) -> Result<Option<Flows>, PlanError> {
    let n = i.steps();
    let dt_h = i.step_s / 3600.0;
    let mut vars = variables!();
    let v = add_vars(&mut vars, i, classes, fix);
    let objective = lp_objective(i, classes, &v);
    let mut problem = solver(vars, objective, time_limit_s);
    for t in 0..n {
        // Import less export is the net load: load, less PV not curtailed, plus charging.
        let mut rhs = Expression::with_capacity(3 + 3 * classes.len());
        rhs.add_mul((i.load_w[t] - i.pv_w[t]) / K, 1.0);
        rhs.add_mul(1.0, v.cur_site[t]);
        for k in 0..classes.len() {
            rhs.add_mul(1.0, v.c[k][t]);
            rhs.add_mul(-1.0, v.d[k][t]);
            if let Some(cur) = &v.cur[k] {
                rhs.add_mul(1.0, cur[t]);
            }
        }
        problem = problem.with((v.imp[t] - v.exp[t]).eq(rhs));
        if fix.hull && fix.grid[t].is_none() {
            let (most_in, most_out) = grid_reach(i, classes, t);
            if most_in > 0.0 && most_out > 0.0 {
                problem =
                    problem.with(((K / most_in) * v.imp[t] + (K / most_out) * v.exp[t]).leq(1.0));
            }
        }
    }
    for (k, cl) in classes.iter().enumerate() {
        for t in 0..n {
            let mut flow = Expression::with_capacity(4);
            flow.add_mul(1.0, v.e[k][t]);
            if t == 0 {
                flow.add_mul(-cl.e0_wh / K, 1.0);
            } else {
                flow.add_mul(-1.0, v.e[k][t - 1]);
            }
            flow.add_mul(-cl.eta_c * dt_h, v.c[k][t]);
            flow.add_mul(dt_h / cl.eta_d, v.d[k][t]);
            problem = problem.with(flow.eq(0.0));
            if fix.hull && fix.battery[k][t].is_none() && cl.max_c_w > 0.0 && cl.max_d_w > 0.0 {
                problem = problem
                    .with(((K / cl.max_c_w) * v.c[k][t] + (K / cl.max_d_w) * v.d[k][t]).leq(1.0));
            }
            if let Some((lo, hi)) = &v.slack[k] {
                problem = problem
                    .with((v.e[k][t] + lo[t]).geq(cl.lo_wh / K))
                    .with((v.e[k][t] - hi[t]).leq(cl.hi_wh / K));
            }
            if rating_binds(i, cl, t) {
                // A hybrid's AC output is its PV (less curtailment) and its battery.
                let mut ac = Expression::with_capacity(3);
                ac.add_mul(1.0, v.d[k][t]);
                ac.add_mul(-1.0, v.c[k][t]);
                ac.add_mul(pv_on(i, cl, t) / K, 1.0);
                if let Some(cur) = &v.cur[k] {
                    ac.add_mul(-1.0, cur[t]);
                }
                problem = problem.with(ac.leq(cl.rated_w / K));
            }
        }
    }
    let solution = match problem.solve() {
        Ok(s) => s,
        Err(ResolutionError::Infeasible) => return Ok(None),
        // good_lp's wording for Clarabel's MaxTime status.
        Err(ResolutionError::Other("Time limit reached")) => {
            return Err(PlanError::Timeout(time_limit_s))
        }
        Err(other) => return Err(PlanError::Solver(other.to_string())),
    };
    let w = |x: &Variable| (solution.value(*x) * K).max(0.0);
    let per_class = |vs: &Vec<Vec<Variable>>| -> Vec<Vec<f64>> {
        vs.iter().map(|r| r.iter().map(w).collect()).collect()
    };
    Ok(Some(Flows {
        import_w: v.imp.iter().map(w).collect(),
        export_w: v.exp.iter().map(w).collect(),
        curtail_site_w: v.cur_site.iter().map(w).collect(),
        curtail_w: v
            .cur
            .iter()
            .map(|c| {
                c.as_ref()
                    .map_or(vec![0.0; n], |c| c.iter().map(w).collect())
            })
            .collect(),
        charge_w: per_class(&v.c),
        discharge_w: per_class(&v.d),
        energy_wh: per_class(&v.e),
        below_wh: v
            .slack
            .iter()
            .map(|s| {
                s.as_ref()
                    .map_or(vec![0.0; n], |(lo, _)| lo.iter().map(w).collect())
            })
            .collect(),
        above_wh: v
            .slack
            .iter()
            .map(|s| {
                s.as_ref()
                    .map_or(vec![0.0; n], |(_, hi)| hi.iter().map(w).collect())
            })
            .collect(),
    }))
}
