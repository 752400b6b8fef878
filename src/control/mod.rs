//! The guard loop's decision: a pure function from what the EMS measured to what each
//! inverter should do. No sockets, no clock reads — time arrives in the [`Snapshot`].
//!
//! Each concern narrows the limits in turn — ratings and SOC bounds, the working mode (and
//! the plan), then the export and import limits — and [`dispatch`] turns what is left into
//! per-inverter setpoints. Rises ramp; falls apply in the same cycle; a deadband stops
//! hunting. If the grid meter has been silent too long, every unit goes to the safe state.

pub mod constraints;
pub mod dispatch;
pub mod follow;
pub mod grid_limit;
pub mod limits;
pub mod mode;
pub mod params;
pub mod stop;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{ConflictPriority, Phase};
pub use constraints::{Binding, Constraints, FleetTarget, GridCap, Source};
use grid_limit::Allowance;
pub use params::{ControlParams, GridLimit, UnitParams};
pub use stop::stop_caps;

/// The grid meter's latest good reading.
#[derive(Debug, Clone, PartialEq)]
pub struct GridReading {
    /// Per phase the grid has: power (+ import) and voltage.
    pub phases: Vec<(Phase, f64, f64)>,
    /// Seconds since this reading.
    pub age_s: f64,
}

/// A unit's fresh measurements, in our signs.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitReading {
    /// AC output per phase, index 0 = L1; + delivered.
    pub ac_phase_w: [f64; 3],
    pub ac_w: f64,
    pub pv_w: f64,
    pub battery_w: f64,
    pub soc_pct: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitHealth {
    Ok,
    Stale,
    /// Fresh, but reporting a fault: held (battery idle, output no higher), never dropped.
    Faulted,
    /// Its measured battery power does not follow its setpoint: held like a faulted unit,
    /// and its share goes to the others.
    NotFollowing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitInput {
    pub health: UnitHealth,
    /// Present when the unit's last read is fresh (also when it reports a fault).
    pub reading: Option<UnitReading>,
}

/// Everything the decision depends on, for one cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub time: DateTime<Utc>,
    /// Monotonic seconds, for ramps.
    pub mono_s: f64,
    pub grid: Option<GridReading>,
    /// One per configured inverter, in config order.
    pub units: Vec<UnitInput>,
    /// The limits and targets in force: site, demand response, plan.
    pub constraints: Constraints,
}

/// What one inverter is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Setpoint {
    /// + discharge, − charge.
    pub battery_w: f64,
    /// Most AC power the unit may deliver; its firmware curtails PV above it.
    pub output_cap_w: f64,
}

/// Memory between cycles: the last setpoints, for ramps and the deadband.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlState {
    last_s: Option<f64>,
    setpoints: Vec<Option<Setpoint>>,
    /// Units whose PV was curtailed last cycle: what they report is less than they have.
    curtailed: Vec<bool>,
    /// Each battery's direction (+1 discharge, −1 charge) and since when (monotonic s).
    direction: Vec<Option<(i8, f64)>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Per unit, in config order; `None` for a unit that cannot be commanded now.
    pub setpoints: Vec<Option<Setpoint>>,
    /// Per unit: held (battery idle, output no higher than now) because it is faulted or
    /// not following (why); it still gets its setpoint.
    pub held: Vec<Option<UnitHealth>>,
    /// The measured grid is beyond a limit now (or the meter is lost, or DRM0): every
    /// decrease goes out at once, past deadbands, dwell times and write intervals.
    pub urgent: bool,
    pub fail_safe: bool,
    /// The constraint that held the fleet back (in status: `export_limit:L2`, `soc`, …).
    pub binding: Option<Binding>,
    /// Behaviour in force: `self_consumption`, `tou_charge`, `backup`, `plan`, `fail_safe`.
    pub active_mode: &'static str,
    pub fleet_target_w: f64,
    /// Grid power per phase (+ import) expected once the setpoints take effect.
    pub predicted_grid_w: [f64; 3],
    /// PV the setpoints hold back, summed over the units (W).
    pub curtailed_w: f64,
}

/// A unit as the concerns see it while narrowing.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitView {
    pub controllable: bool,
    /// Faulted or not following: commanded, but given no battery share and no rise.
    pub held: bool,
    pub rated_w: f64,
    pub weight: [f64; 3],
    pub three_phase: bool,
    pub soc_pct: f64,
    /// PV the unit could convert now (an estimate while it is curtailed).
    pub pv_w: f64,
    /// PV it is planned to convert.
    pub pv_used_w: f64,
    /// Battery window, + discharge.
    pub lo: f64,
    pub hi: f64,
    pub battery_w: f64,
}

/// Fastest rise per cycle for a unit.
fn ramp_w(p: &ControlParams, rated_w: f64, dt_s: f64) -> f64 {
    rated_w * p.ramp_pct_per_s / 100.0 * dt_s
}

/// Headroom above the planned output that lets a PV rise show up in the next reading.
fn probe_w(p: &ControlParams, rated_w: f64, dt_s: f64) -> f64 {
    ramp_w(p, rated_w, dt_s).min(0.05 * rated_w)
}

/// Charge power a unit may take from its rating, battery and SOC.
fn charge_room(u: &UnitParams, soc_pct: f64) -> f64 {
    if soc_pct >= u.soc_max_pct {
        0.0
    } else {
        u.max_charge_w.min(u.rated_w)
    }
}

fn discharge_room(u: &UnitParams, soc_pct: f64) -> f64 {
    if soc_pct <= u.soc_min_pct {
        0.0
    } else {
        u.max_discharge_w.min(u.rated_w)
    }
}

/// One cycle's decision.
pub fn step(p: &ControlParams, s: &Snapshot, prev: &ControlState) -> (Decision, ControlState) {
    let dt_s = prev
        .last_s
        .map(|t| (s.mono_s - t).clamp(0.0, 10.0))
        .unwrap_or(p.cycle_s);
    let prev_sp = |k: usize| prev.setpoints.get(k).copied().flatten();

    let grid = s.grid.as_ref().filter(|g| g.age_s <= p.fail_safe_after_s);
    let Some(grid) = grid else {
        return fail_safe(p, s);
    };
    let c = &s.constraints;
    if c.standby {
        return standby(p, s);
    }

    let mut net_w = [0.0; 3];
    let mut voltage_v = [p.nominal_v; 3];
    for &(phase, power_w, v) in &grid.phases {
        net_w[phase.index()] = power_w;
        if v > 50.0 {
            voltage_v[phase.index()] = v;
        }
    }
    // A limit crossed now, or the wiring check (each nudge and its end must reach the unit at
    // once to be measured): every change goes out this cycle.
    let urgent = beyond_limits(p, c, net_w, voltage_v) || c.commissioning.is_some();

    // Ratings and SOC bounds.
    let mut soc_bound = false;
    let mut units: Vec<UnitView> = p
        .units
        .iter()
        .enumerate()
        .map(|(k, up)| {
            let input = s.units.get(k);
            let reading = input.and_then(|i| i.reading.as_ref());
            let health = input.map_or(UnitHealth::Stale, |i| i.health);
            let controllable = health != UnitHealth::Stale && reading.is_some();
            let held = matches!(health, UnitHealth::Faulted | UnitHealth::NotFollowing);
            let mut weight = [0.0; 3];
            for ph in Phase::ALL {
                weight[ph.index()] = up.weight(ph);
            }
            let mut view = UnitView {
                controllable,
                held,
                rated_w: up.rated_w,
                weight,
                three_phase: up.is_three_phase(),
                soc_pct: 0.0,
                pv_w: 0.0,
                pv_used_w: 0.0,
                lo: 0.0,
                hi: 0.0,
                battery_w: 0.0,
            };
            if let (true, Some(r)) = (controllable, reading) {
                for (n, a) in net_w.iter_mut().zip(r.ac_phase_w) {
                    *n += a;
                }
                // A curtailed unit reports the PV it was allowed, not what it has: offer it a
                // little more each cycle, so PV comes back as soon as the limits allow.
                let curtailed = prev.curtailed.get(k).copied().unwrap_or(false);
                let probe = if curtailed {
                    probe_w(p, up.rated_w, dt_s)
                } else {
                    0.0
                };
                view.pv_w = r.pv_w.max(0.0) + probe;
                view.soc_pct = r.soc_pct;
                let chg = charge_room(up, r.soc_pct);
                let dis = discharge_room(up, r.soc_pct);
                soc_bound |= chg == 0.0 || dis == 0.0;
                // The AC side must stay within the rating too.
                view.hi = dis.min((up.rated_w - view.pv_w).max(0.0));
                view.lo = -chg.min(up.rated_w + view.pv_w);
                view.pv_used_w = view.pv_w;
                if held {
                    // It does what it does: plan with its measured battery power, which the
                    // limits may only bring towards idle.
                    view.lo = r.battery_w.min(0.0);
                    view.hi = r.battery_w.max(0.0);
                }
                // Demand response: generation and consumption caps per unit (DRM1–3, 5–7).
                if let Some(pct) = c.generation_pct {
                    view.hi = view.hi.min(pct / 100.0 * up.rated_w);
                }
                if let Some(pct) = c.consumption_pct {
                    view.lo = view
                        .lo
                        .max(-pct / 100.0 * up.rated_w - view.pv_w)
                        .min(view.hi);
                }
            }
            view
        })
        .collect();

    let pv_total: f64 = units
        .iter()
        .filter(|u| u.controllable)
        .map(|u| u.pv_w)
        .sum();
    let self_use_w = net_w.iter().sum::<f64>() - pv_total;

    // Working mode (and plan), unless demand response sets the fleet's target.
    let mut intent = mode::apply(&p.mode, s.time, &mut units, self_use_w, c.plan.as_deref());
    match c.fleet_target {
        Some(FleetTarget::BatteryW(w)) => {
            intent = mode::ModeIntent {
                active: "dr_fleet_battery",
                fleet_target_w: w,
                fixed_w: vec![None; units.len()],
            }
        }
        Some(FleetTarget::GridW(target)) => {
            intent = mode::ModeIntent {
                active: "dr_grid_target",
                fleet_target_w: self_use_w - target,
                fixed_w: vec![None; units.len()],
            }
        }
        None => {}
    }
    if let Some(targets) = &c.commissioning {
        intent = mode::ModeIntent {
            active: "commissioning",
            fleet_target_w: self_use_w,
            fixed_w: (0..units.len()).map(|k| targets.get(k).copied()).collect(),
        };
    }
    // Held units keep their measured battery power in the sharing: the others cover.
    for (k, u) in units.iter().enumerate() {
        if u.held {
            let measured = s.units[k].reading.as_ref().map_or(0.0, |r| r.battery_w);
            intent.fixed_w[k] = Some(measured);
        }
    }
    dispatch::share(&mut units, &intent.fixed_w, intent.fleet_target_w);
    let generation_cap = |rated_w: f64| {
        c.generation_pct
            .map_or(rated_w, |pct| pct / 100.0 * rated_w)
    };
    for u in units.iter_mut().filter(|u| u.controllable) {
        // PV beyond the rating (or a DRM generation cap) is clipped.
        u.pv_used_w = u
            .pv_used_w
            .min((generation_cap(u.rated_w) - u.battery_w).max(0.0));
    }

    // Export and import limits, all at once.
    let in_force = limits_in_force(p, c, voltage_v);
    let out_max_w: Vec<f64> = units.iter().map(|u| generation_cap(u.rated_w)).collect();
    let binding = limits::hold(
        &mut units,
        net_w,
        &in_force,
        p.conflict_priority,
        &out_max_w,
    );

    // Output caps: the planned output plus this unit's share of what the limit leaves (or
    // a small probe, so more PV can show itself); exactly the plan while curtailing.
    let residual = in_force
        .iter()
        .filter(|l| l.export)
        .map(|l| grid_limit::residual_share(&units, net_w, l.allowance))
        .reduce(|a, b| a.iter().zip(b).map(|(x, y)| x.min(y)).collect())
        .unwrap_or_else(|| vec![0.0; units.len()]);
    let mut setpoints = vec![None; units.len()];
    let mut curtailed = vec![false; units.len()];
    let mut direction = vec![None; units.len()];
    for (k, u) in units.iter().enumerate() {
        direction[k] = prev.direction.get(k).copied().flatten();
        if !u.controllable {
            continue;
        }
        curtailed[k] = u.pv_used_w < u.pv_w - 1.0;
        let planned = u.pv_used_w + u.battery_w;
        let mut cap = if curtailed[k] {
            planned
        } else {
            planned + residual[k].max(probe_w(p, u.rated_w, dt_s))
        };
        if u.held {
            // No rise for a unit we cannot trust: at most what it delivers now.
            let now_w = s.units[k].reading.as_ref().map_or(0.0, |r| r.ac_w);
            cap = cap.min(now_w.max(0.0));
        }
        let mut sp = Setpoint {
            // A held unit is told to idle, whatever it does now.
            battery_w: if u.held { 0.0 } else { u.battery_w },
            output_cap_w: cap.clamp(0.0, generation_cap(u.rated_w)),
        };
        let before = prev_sp(k).unwrap_or(Setpoint {
            battery_w: s.units[k].reading.as_ref().map_or(0.0, |r| r.battery_w),
            output_cap_w: u.rated_w,
        });
        let ramp = ramp_w(p, u.rated_w, dt_s);
        let up = &p.units[k];
        let deadband = up.deadband_w(p.deadband_w, p.deadband_pct);
        sp.battery_w = settle(sp.battery_w, before.battery_w, ramp, deadband, urgent);
        sp.battery_w = sp.battery_w.clamp(u.lo.min(u.hi), u.hi.max(u.lo));
        // The wiring check turns a battery on purpose, once per unit, with the installer
        // watching: no dwell (it is urgent).
        let turn = Turn {
            dwell_s: p.direction_dwell_s,
            min_w: deadband,
            urgent,
            now_s: s.mono_s,
        };
        (sp.battery_w, direction[k]) = turn.apply(sp.battery_w, direction[k]);
        sp.battery_w = up.quantize_above(sp.battery_w, u.lo.min(u.hi));
        sp.output_cap_w = settle(
            sp.output_cap_w,
            before.output_cap_w,
            ramp,
            deadband,
            urgent && sp.output_cap_w < before.output_cap_w,
        )
        .clamp(0.0, u.rated_w);
        sp.output_cap_w = up.quantize(sp.output_cap_w.min(generation_cap(u.rated_w)));
        setpoints[k] = Some(sp);
    }
    one_direction(&mut setpoints, &units, &p.units);

    // The outcome, as the setpoints will make it.
    let mut after = units.clone();
    for (u, sp) in after.iter_mut().zip(&setpoints) {
        if let Some(sp) = sp {
            // A held unit is told to idle but is expected to go on doing what it does.
            if !u.held {
                u.battery_w = sp.battery_w;
            }
            u.pv_used_w = u.pv_used_w.min((sp.output_cap_w - sp.battery_w).max(0.0));
        }
    }
    // Export first (or no import limit to push over): what settling moved off the plan
    // comes back out of the caps.
    let export_first =
        p.conflict_priority == ConflictPriority::Export || in_force.iter().all(|l| l.export);
    if export_first {
        let mut caps: Vec<Option<f64>> = setpoints
            .iter()
            .map(|s| s.map(|s| s.output_cap_w))
            .collect();
        for l in in_force.iter().filter(|l| l.export) {
            grid_limit::trim_to_export(&mut after, &mut caps, net_w, l.allowance);
        }
        for ((sp, cap), up) in setpoints.iter_mut().zip(caps).zip(&p.units) {
            if let (Some(sp), Some(cap)) = (sp.as_mut(), cap) {
                if cap < sp.output_cap_w {
                    sp.output_cap_w = up.quantize(cap.max(0.0));
                }
            }
        }
    }
    let predicted_grid_w = grid_limit::predict(&after, net_w);
    let curtailed_w = after
        .iter()
        .filter(|u| u.controllable)
        .map(|u| (u.pv_w - u.pv_used_w).max(0.0))
        .sum();

    let binding = binding.or(soc_bound.then_some(Binding::Soc));
    let decision = Decision {
        setpoints: setpoints.clone(),
        held: units
            .iter()
            .zip(&s.units)
            .map(|(u, i)| (u.controllable && u.held).then_some(i.health))
            .collect(),
        urgent,
        fail_safe: false,
        binding,
        active_mode: intent.active,
        fleet_target_w: intent.fleet_target_w,
        predicted_grid_w,
        curtailed_w,
    };
    (
        decision,
        ControlState {
            last_s: Some(s.mono_s),
            setpoints,
            curtailed,
            direction,
        },
    )
}

/// The measured grid is beyond an export or import limit in force (no margin).
fn beyond_limits(
    p: &ControlParams,
    c: &Constraints,
    grid_w: [f64; 3],
    voltage_v: [f64; 3],
) -> bool {
    let beyond =
        |limit: GridLimit, sign: f64| match Allowance::new(limit, &p.phases, voltage_v, 0.0) {
            Allowance::Total(a) => sign * grid_w.iter().sum::<f64>() > a,
            Allowance::Phase(a) => a
                .iter()
                .zip(grid_w)
                .any(|(a, g)| a.is_some_and(|a| sign * g > a)),
        };
    c.export.iter().any(|cap| beyond(cap.limit, -1.0))
        || c.import.iter().any(|cap| beyond(cap.limit, 1.0))
}

/// Direction changes of a battery: at most one per dwell time, and only to a power worth
/// turning for, unless the grid limit needs it now.
struct Turn {
    dwell_s: f64,
    min_w: f64,
    urgent: bool,
    now_s: f64,
}

impl Turn {
    /// The battery power to send instead of `want_w`, and the direction from now on.
    fn apply(&self, want_w: f64, held: Option<(i8, f64)>) -> (f64, Option<(i8, f64)>) {
        let want: i8 = if want_w > 0.5 {
            1
        } else if want_w < -0.5 {
            -1
        } else {
            0
        };
        match held {
            Some((dir, _)) if want == dir => (want_w, held),
            _ if want == 0 => (0.0, held),
            None => (want_w, Some((want, self.now_s))),
            Some((_, since)) => {
                let settled = self.now_s - since >= self.dwell_s && want_w.abs() >= self.min_w;
                if self.urgent || settled {
                    (want_w, Some((want, self.now_s)))
                } else {
                    (0.0, held)
                }
            }
        }
    }
}

/// Every export and import limit in force (the site's and demand response's), with the
/// margin taken off.
fn limits_in_force(p: &ControlParams, c: &Constraints, voltage_v: [f64; 3]) -> Vec<limits::Limit> {
    let limit = |cap: &GridCap, export: bool| limits::Limit {
        source: cap.source,
        export,
        allowance: Allowance::new(cap.limit, &p.phases, voltage_v, p.margin_w),
    };
    c.export
        .iter()
        .map(|cap| limit(cap, true))
        .chain(c.import.iter().map(|cap| limit(cap, false)))
        .collect()
}

/// Never one battery charging from another: when ramps leave a battery still on its way out
/// of one direction while others already go the other way, the fleet's net power goes to
/// the side that is ahead and the other side idles. The fleet's output is unchanged.
fn one_direction(setpoints: &mut [Option<Setpoint>], units: &[UnitView], up: &[UnitParams]) {
    let free = |k: usize| !units[k].held;
    let (mut pos, mut neg) = (0.0, 0.0);
    for (k, sp) in setpoints.iter().enumerate() {
        if let (true, Some(sp)) = (free(k), sp) {
            if sp.battery_w > 0.0 {
                pos += sp.battery_w;
            } else {
                neg -= sp.battery_w;
            }
        }
    }
    if pos <= 0.0 || neg <= 0.0 {
        return;
    }
    // Each battery on the leading side keeps its share of the net power.
    let (lead_positive, keep) = if pos >= neg {
        (true, (pos - neg) / pos)
    } else {
        (false, (neg - pos) / neg)
    };
    for (k, sp) in setpoints.iter_mut().enumerate() {
        if let (true, Some(sp)) = (free(k), sp.as_mut()) {
            let leading = (sp.battery_w > 0.0) == lead_positive;
            sp.battery_w = if leading {
                up[k].quantize(sp.battery_w * keep)
            } else {
                0.0
            };
        }
    }
}

/// Move from `before` towards `want`: rises by at most `ramp`, falls at once; changes under
/// `deadband` are dropped unless they are falls needed now (`urgent`: the grid is beyond a
/// limit).
fn settle(want: f64, before: f64, ramp: f64, deadband: f64, urgent: bool) -> f64 {
    let next = if want > before {
        want.min(before + ramp)
    } else {
        want
    };
    if (next - before).abs() < deadband && !(next < before && urgent) {
        before
    } else {
        next
    }
}

/// DRM0: every reachable unit in standby — no battery power, no output.
fn standby(p: &ControlParams, s: &Snapshot) -> (Decision, ControlState) {
    hold_all(p, s, false, Binding::Standby, "dr_standby", |_, _| {
        Setpoint {
            battery_w: 0.0,
            output_cap_w: 0.0,
        }
    })
}

/// Grid meter lost: zero export from every unit that can be reached — no output above zero,
/// and the battery either idle or soaking up the unit's own PV.
fn fail_safe(p: &ControlParams, s: &Snapshot) -> (Decision, ControlState) {
    hold_all(p, s, true, Binding::FailSafe, "fail_safe", |up, r| {
        Setpoint {
            battery_w: -r.pv_w.max(0.0).min(charge_room(up, r.soc_pct)),
            output_cap_w: 0.0,
        }
    })
}

/// Every unit with a fresh reading to the setpoint `each` gives it; no narrowing, no ramps.
fn hold_all(
    p: &ControlParams,
    s: &Snapshot,
    fail_safe: bool,
    binding: Binding,
    active_mode: &'static str,
    each: impl Fn(&UnitParams, &UnitReading) -> Setpoint,
) -> (Decision, ControlState) {
    let setpoints: Vec<Option<Setpoint>> = p
        .units
        .iter()
        .enumerate()
        .map(|(k, up)| Some(each(up, s.units.get(k)?.reading.as_ref()?)))
        .collect();
    (
        Decision {
            held: vec![None; setpoints.len()],
            setpoints: setpoints.clone(),
            urgent: true,
            fail_safe,
            binding: Some(binding),
            active_mode,
            fleet_target_w: 0.0,
            predicted_grid_w: [0.0; 3],
            curtailed_w: 0.0,
        },
        ControlState {
            last_s: Some(s.mono_s),
            curtailed: vec![false; setpoints.len()],
            direction: vec![None; setpoints.len()],
            setpoints,
        },
    )
}

#[cfg(test)]
mod tests;
