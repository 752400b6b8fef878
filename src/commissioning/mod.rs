//! The wiring check run at commissioning: two wiring faults silently defeat export limiting
//! — a CT clamp reversed or on the wrong phase (the EMS reads export as import and does the
//! opposite), and a single-phase unit configured on the wrong phase. With the installer's
//! consent, each unit's battery is nudged to charge a little more (charging only adds
//! import, so the export limit holds) while every other unit holds what it was doing, and
//! the grid meter's per-phase response is compared with what the site file predicts.
//!
//! Pure: [`WiringCheck::step`] takes each cycle's [`Observation`] and returns the battery
//! targets to hold next; [`WiringCheck::report`] reads the responses.

use serde::Serialize;

use crate::config::Phase;

/// Time to let the site settle after a change before it is measured, s (the units ramp,
/// the meter averages).
pub const SETTLE_S: f64 = 3.0;
/// Time averaged for one measurement, s.
pub const SAMPLE_S: f64 = 1.5;
/// The nudge, as a share of the unit's rating, at least [`MIN_NUDGE_W`].
pub const NUDGE_SHARE: f64 = 0.2;
pub const MIN_NUDGE_W: f64 = 1000.0;
/// A response counts when it is at least this share of what was expected.
const RESPONDS: f64 = 0.5;
/// PV meter readings this small say nothing about its direction, W.
const PV_QUIET_W: f64 = 100.0;

/// A unit as the site file describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub id: String,
    pub phases: Vec<Phase>,
    pub rated_w: f64,
    /// Most charge its battery takes, W (0: no battery).
    pub max_charge_w: f64,
    pub soc_max_pct: f64,
}

/// What the check needs of the site.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSpec {
    pub grid_meter: String,
    pub grid_phases: Vec<Phase>,
    pub pv_meter: Option<String>,
    pub units: Vec<UnitSpec>,
}

/// One cycle as the EMS read it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Grid power per phase (L1, L2, L3), + import, as the grid meter reads it.
    pub grid_w: Option<[f64; 3]>,
    /// The PV meter, + generation.
    pub pv_w: Option<f64>,
    /// Per unit: measured battery power (+ discharge) and SOC, when fresh.
    pub units: Vec<Option<(f64, f64)>>,
    /// The export limit curtailed PV this cycle: the site's output was not the units' own.
    pub curtailing: bool,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    /// `ct_direction`, `unit_phase`, `unit_balance`, `pv_meter_direction`, `nudge`.
    pub name: &'static str,
    /// The meter phase (`grid:L2`), unit or meter checked.
    pub device: String,
    pub result: Outcome,
    pub detail: String,
    /// What to change, for a failure.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub checks: Vec<CheckResult>,
}

impl Report {
    pub fn all_pass(&self) -> bool {
        self.checks.iter().all(|c| c.result == Outcome::Pass)
    }
}

/// One unit's nudge and what the grid meter did.
#[derive(Debug, Clone, PartialEq)]
struct Response {
    unit: usize,
    nudge_w: f64,
    /// Change of grid power per phase, + more import.
    delta_w: [f64; 3],
    /// The export limit curtailed PV while it was measured.
    disturbed: bool,
}

/// Sums of a measurement under way.
#[derive(Debug, Clone, Default, PartialEq)]
struct Samples {
    sum: [f64; 3],
    n: u32,
    disturbed: bool,
}

impl Samples {
    fn add(&mut self, obs: &Observation) {
        if let Some(g) = obs.grid_w {
            for (s, v) in self.sum.iter_mut().zip(g) {
                *s += v;
            }
            self.n += 1;
        }
        self.disturbed |= obs.curtailing;
    }

    fn mean(&self) -> Option<[f64; 3]> {
        (self.n > 0).then(|| self.sum.map(|s| s / f64::from(self.n)))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WiringCheck {
    site: SiteSpec,
    /// What each unit's battery held when the check began: held throughout.
    base_w: Vec<f64>,
    /// Units to nudge, in order, with their nudge (charge, W).
    order: Vec<(usize, f64)>,
    skipped: Vec<CheckResult>,
    cursor: usize,
    tick: u32,
    baseline: Samples,
    nudged: Samples,
    responses: Vec<Response>,
    pv: Vec<f64>,
    done: bool,
    settle: u32,
    sample: u32,
}

impl WiringCheck {
    /// Plan the check from the site and its state now (`first`), for a loop of `cycle_s`.
    pub fn new(site: SiteSpec, first: &Observation, cycle_s: f64) -> WiringCheck {
        let cycles = |s: f64| (s / cycle_s.max(0.01)).ceil().max(2.0) as u32;
        let mut order = Vec::new();
        let mut skipped = Vec::new();
        let mut base_w = Vec::with_capacity(site.units.len());
        for (k, u) in site.units.iter().enumerate() {
            let now = first.units.get(k).copied().flatten();
            base_w.push(now.map_or(0.0, |(b, _)| b));
            let why = match now {
                _ if u.max_charge_w <= 0.0 => Some("the unit has no battery to nudge".to_string()),
                None => Some("the unit has no fresh reading".to_string()),
                Some((_, soc)) if soc >= u.soc_max_pct - 2.0 => Some(format!(
                    "its battery is full ({soc:.0} %): it cannot charge more"
                )),
                Some((b, _)) => {
                    let room = u.max_charge_w.min(u.rated_w) + b.min(0.0);
                    let nudge = (NUDGE_SHARE * u.rated_w).max(MIN_NUDGE_W).min(room);
                    if nudge < MIN_NUDGE_W / 2.0 {
                        Some(format!("it charges at {:.0} W already, near its limit", -b))
                    } else {
                        order.push((k, nudge));
                        None
                    }
                }
            };
            if let Some(why) = why {
                skipped.push(CheckResult {
                    name: "nudge",
                    device: u.id.clone(),
                    result: Outcome::Skipped,
                    detail: why,
                    fix: None,
                });
            }
        }
        WiringCheck {
            site,
            base_w,
            order,
            skipped,
            cursor: 0,
            tick: 0,
            baseline: Samples::default(),
            nudged: Samples::default(),
            responses: Vec::new(),
            pv: Vec::new(),
            done: false,
            settle: cycles(SETTLE_S),
            sample: cycles(SAMPLE_S),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Units nudged so far and in all.
    pub fn progress(&self) -> (usize, usize) {
        (self.cursor.min(self.order.len()), self.order.len())
    }

    /// How many cycles the whole check takes.
    pub fn cycles(&self) -> u32 {
        self.order.len() as u32 * 2 * (self.settle + self.sample) + 1
    }

    /// Take this cycle's observation; the battery targets to hold next (+ discharge, per
    /// unit), or `None` once the check is over.
    pub fn step(&mut self, obs: &Observation) -> Option<Vec<f64>> {
        if self.done {
            return None;
        }
        if let Some(pv) = obs.pv_w {
            self.pv.push(pv);
        }
        let Some(&(unit, nudge_w)) = self.order.get(self.cursor) else {
            self.done = true;
            return None;
        };
        let t = self.tick;
        let (settle, sample) = (self.settle, self.sample);
        if (settle..settle + sample).contains(&t) {
            self.baseline.add(obs);
        } else if (2 * settle + sample..2 * (settle + sample)).contains(&t) {
            self.nudged.add(obs);
        }
        self.tick += 1;
        if self.tick == 2 * (settle + sample) {
            if let (Some(before), Some(after)) = (self.baseline.mean(), self.nudged.mean()) {
                self.responses.push(Response {
                    unit,
                    nudge_w,
                    delta_w: [0, 1, 2].map(|p| after[p] - before[p]),
                    disturbed: self.baseline.disturbed || self.nudged.disturbed,
                });
            }
            self.cursor += 1;
            self.tick = 0;
            self.baseline = Samples::default();
            self.nudged = Samples::default();
            if self.cursor == self.order.len() {
                self.done = true;
                return None;
            }
            return Some(self.base_w.clone());
        }
        let mut targets = self.base_w.clone();
        if self.tick >= settle + sample {
            targets[unit] -= nudge_w;
        }
        Some(targets)
    }

    /// The phase a single-phase unit's nudge showed up on, and how much of it.
    fn strongest(r: &Response) -> (Phase, f64) {
        Phase::ALL
            .into_iter()
            .map(|p| (p, r.delta_w[p.index()]))
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap_or((Phase::L1, 0.0))
    }

    /// What each phase was expected to show, per clean response: the units' own phases, a
    /// single-phase unit on the phase it showed up on (a wrong phase is its own check).
    fn expected(&self, r: &Response) -> [f64; 3] {
        let u = &self.site.units[r.unit];
        let mut e = [0.0; 3];
        if u.phases.len() == 1 {
            e[Self::strongest(r).0.index()] = r.nudge_w;
        } else {
            for p in &u.phases {
                e[p.index()] = r.nudge_w / u.phases.len() as f64;
            }
        }
        e
    }

    pub fn report(&self) -> Report {
        let mut checks = self.skipped.clone();
        let clean: Vec<&Response> = self.responses.iter().filter(|r| !r.disturbed).collect();
        for r in self.responses.iter().filter(|r| r.disturbed) {
            checks.push(CheckResult {
                name: "nudge",
                device: self.site.units[r.unit].id.clone(),
                result: Outcome::Skipped,
                detail: "the export limit curtailed PV while the unit was measured, so the meter's change was not the unit's alone".into(),
                fix: Some("run the check again with more load or less sun".into()),
            });
        }
        self.ct_checks(&clean, &mut checks);
        for r in &clean {
            checks.push(self.unit_check(r));
        }
        if let Some(pv) = self.pv_check() {
            checks.push(pv);
        }
        Report { checks }
    }

    fn ct_checks(&self, clean: &[&Response], checks: &mut Vec<CheckResult>) {
        let meter = &self.site.grid_meter;
        for &p in &self.site.grid_phases {
            let k = p.index();
            let expected: f64 = clean.iter().map(|r| self.expected(r)[k]).sum();
            let seen: f64 = clean.iter().map(|r| r.delta_w[k]).sum();
            let device = format!("{meter}:{}", p.as_str());
            let result = if expected <= 0.0 {
                CheckResult {
                    name: "ct_direction",
                    device,
                    result: Outcome::Skipped,
                    detail: format!("no unit that could be nudged feeds {}", p.as_str()),
                    fix: None,
                }
            } else if seen >= RESPONDS * expected {
                CheckResult {
                    name: "ct_direction",
                    device,
                    result: Outcome::Pass,
                    detail: format!(
                        "import on {} rose {seen:.0} W for {expected:.0} W of charging",
                        p.as_str()
                    ),
                    fix: None,
                }
            } else if seen <= -RESPONDS * expected {
                CheckResult {
                    name: "ct_direction",
                    device,
                    result: Outcome::Fail,
                    detail: format!(
                        "import on {} fell {:.0} W when the units charged {expected:.0} W more: the meter reads this phase backwards",
                        p.as_str(),
                        -seen
                    ),
                    fix: Some(format!(
                        "turn the {} current transformer of meter `{meter}` round (its arrow towards the site), or swap its two wires at the meter",
                        p.as_str()
                    )),
                }
            } else {
                CheckResult {
                    name: "ct_direction",
                    device,
                    result: Outcome::Fail,
                    detail: format!(
                        "{} changed {seen:.0} W for {expected:.0} W of charging: its CT does not see the units",
                        p.as_str()
                    ),
                    fix: Some(format!(
                        "check that the {} CT of meter `{meter}` is closed round the {} conductor of the supply, between the grid and the site",
                        p.as_str(),
                        p.as_str()
                    )),
                }
            };
            checks.push(result);
        }
    }

    /// A reversed CT flips a phase's response; the unit checks read magnitudes, so a CT
    /// fault is reported once, by its own check.
    fn unit_check(&self, r: &Response) -> CheckResult {
        let u = &self.site.units[r.unit];
        let shown: Vec<String> = self
            .site
            .grid_phases
            .iter()
            .map(|p| format!("{} {:+.0} W", p.as_str(), r.delta_w[p.index()]))
            .collect();
        let shown = shown.join(", ");
        if u.phases.len() == 1 {
            let configured = u.phases[0];
            let (actual, w) = Self::strongest(r);
            if w.abs() < RESPONDS * r.nudge_w {
                return CheckResult {
                    name: "unit_phase",
                    device: u.id.clone(),
                    result: Outcome::Fail,
                    detail: format!(
                        "a {:.0} W charge barely showed at the meter ({shown})",
                        r.nudge_w
                    ),
                    fix: Some(format!(
                        "check that `{}` follows its setpoints and feeds through the grid meter",
                        u.id
                    )),
                };
            }
            if actual != configured {
                return CheckResult {
                    name: "unit_phase",
                    device: u.id.clone(),
                    result: Outcome::Fail,
                    detail: format!(
                        "its {:.0} W charge showed on {} ({shown}), but the site file puts it on {}",
                        r.nudge_w,
                        actual.as_str(),
                        configured.as_str()
                    ),
                    fix: Some(format!(
                        "set `phase: {}` for `{}` in the site file (or connect the unit to {})",
                        actual.as_str(),
                        u.id,
                        configured.as_str()
                    )),
                };
            }
            return CheckResult {
                name: "unit_phase",
                device: u.id.clone(),
                result: Outcome::Pass,
                detail: format!(
                    "its {:.0} W charge showed on {} ({shown})",
                    r.nudge_w,
                    actual.as_str()
                ),
                fix: None,
            };
        }
        let share = r.nudge_w / u.phases.len() as f64;
        let balanced = u.phases.iter().all(|p| {
            let seen = r.delta_w[p.index()].abs();
            seen >= RESPONDS * share && seen <= (2.0 - RESPONDS) * share
        });
        CheckResult {
            name: "unit_balance",
            device: u.id.clone(),
            result: if balanced { Outcome::Pass } else { Outcome::Fail },
            detail: format!("a {:.0} W charge showed as {shown} ({share:.0} W a phase expected)", r.nudge_w),
            fix: (!balanced).then(|| {
                format!(
                    "check the AC connection of `{}` on every phase, and that the grid meter's CTs are each on their own phase",
                    u.id
                )
            }),
        }
    }

    fn pv_check(&self) -> Option<CheckResult> {
        let meter = self.site.pv_meter.clone()?;
        if self.pv.is_empty() {
            return Some(CheckResult {
                name: "pv_meter_direction",
                device: meter,
                result: Outcome::Skipped,
                detail: "the PV meter had no fresh reading".into(),
                fix: None,
            });
        }
        let mean = self.pv.iter().sum::<f64>() / self.pv.len() as f64;
        Some(if mean.abs() < PV_QUIET_W {
            CheckResult {
                name: "pv_meter_direction",
                device: meter,
                result: Outcome::Skipped,
                detail: format!(
                    "the PV meter read {mean:.0} W: no generation to tell its direction by"
                ),
                fix: Some("run the check again while the sun is on the panels".into()),
            }
        } else if mean > 0.0 {
            CheckResult {
                name: "pv_meter_direction",
                device: meter,
                result: Outcome::Pass,
                detail: format!("the PV meter reads generation as +{mean:.0} W"),
                fix: None,
            }
        } else {
            CheckResult {
                name: "pv_meter_direction",
                device: meter.clone(),
                result: Outcome::Fail,
                detail: format!("the PV meter reads generation as {mean:.0} W: it is wired backwards"),
                fix: Some(format!(
                    "turn the PV meter's CTs round (or swap its in and out), or set `invert: true` on meter `{meter}`"
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> SiteSpec {
        let unit = |id: &str, phases: Vec<Phase>| UnitSpec {
            id: id.into(),
            phases,
            rated_w: 5000.0,
            max_charge_w: 5000.0,
            soc_max_pct: 100.0,
        };
        SiteSpec {
            grid_meter: "grid".into(),
            grid_phases: Phase::ALL.to_vec(),
            pv_meter: None,
            units: vec![
                unit("three", Phase::ALL.to_vec()),
                unit("one", vec![Phase::L1]),
            ],
        }
    }

    /// Run the check against a site whose meter shows each unit's extra charge on
    /// `shows(unit)` (per phase), with `flip` applied to each phase's reading.
    fn run(shows: impl Fn(usize) -> [f64; 3], flip: [f64; 3]) -> Report {
        let obs = |targets: &[f64]| Observation {
            grid_w: Some({
                let mut g = [1000.0; 3];
                for (k, t) in targets.iter().enumerate() {
                    for (p, share) in shows(k).iter().enumerate() {
                        g[p] += -t * share;
                    }
                }
                [0, 1, 2].map(|p| g[p] * flip[p])
            }),
            pv_w: None,
            units: vec![Some((0.0, 50.0)); 2],
            curtailing: false,
        };
        let mut check = WiringCheck::new(site(), &obs(&[0.0, 0.0]), 1.0);
        let mut targets = vec![0.0, 0.0];
        for _ in 0..check.cycles() + 5 {
            match check.step(&obs(&targets)) {
                Some(t) => targets = t,
                None => break,
            }
        }
        assert!(check.is_done());
        check.report()
    }

    fn outcome(r: &Report, name: &str, device: &str) -> Outcome {
        r.checks
            .iter()
            .find(|c| c.name == name && c.device == device)
            .unwrap_or_else(|| panic!("{name} {device} in {r:#?}"))
            .result
    }

    const THIRDS: [f64; 3] = [1.0 / 3.0; 3];

    #[test]
    fn a_correct_site_passes() {
        let r = run(|k| if k == 0 { THIRDS } else { [1.0, 0.0, 0.0] }, [1.0; 3]);
        assert!(r.all_pass(), "{r:#?}");
    }

    #[test]
    fn a_reversed_ct_and_a_unit_on_the_wrong_phase_are_found() {
        let r = run(
            |k| if k == 0 { THIRDS } else { [0.0, 1.0, 0.0] },
            [1.0, -1.0, 1.0],
        );
        assert_eq!(outcome(&r, "ct_direction", "grid:L2"), Outcome::Fail);
        assert_eq!(outcome(&r, "ct_direction", "grid:L1"), Outcome::Pass);
        assert_eq!(outcome(&r, "unit_phase", "one"), Outcome::Fail);
        let fix = r
            .checks
            .iter()
            .find(|c| c.device == "one")
            .unwrap()
            .fix
            .clone()
            .unwrap();
        assert!(fix.contains("phase: L2"), "{fix}");
    }
}
