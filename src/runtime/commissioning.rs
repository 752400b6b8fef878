//! The wiring check at run time: asked for by `ems commission` or from the page (with the
//! token), refused during fail-safe or demand response, run cycle by cycle beside the guard
//! loop (its targets replace the working mode; every limit still holds), and handed back
//! when done.

use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::commissioning::{Observation, Report, SiteSpec, UnitSpec, WiringCheck};
use crate::config::{MeterRole, SiteConfig};

/// The check as others see it: asked for, under way, refused, or its report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommissionState {
    /// A check is under way.
    pub running: bool,
    /// Units nudged so far, and in all.
    pub progress: Option<(usize, usize)>,
    pub started: Option<DateTime<Utc>>,
    pub finished: Option<DateTime<Utc>>,
    /// Why the last request was refused.
    pub refused: Option<String>,
    /// The last check's findings.
    pub report: Option<Report>,
    #[serde(skip)]
    requested: bool,
}

/// Shared between the loop and whoever asks for a check.
#[derive(Clone, Default)]
pub struct CommissionSlot(Arc<Mutex<CommissionState>>);

impl CommissionSlot {
    fn lock(&self) -> MutexGuard<'_, CommissionState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ask for a check; false when one is under way already.
    pub fn request(&self) -> bool {
        let mut s = self.lock();
        if s.running || s.requested {
            return false;
        }
        s.requested = true;
        s.refused = None;
        true
    }

    pub fn state(&self) -> CommissionState {
        self.lock().clone()
    }
}

/// The site as the check needs it.
fn spec(c: &SiteConfig) -> SiteSpec {
    SiteSpec {
        grid_meter: c
            .grid_meter()
            .map_or_else(|| "grid".to_string(), |m| m.id.clone()),
        grid_phases: c.phases(),
        pv_meter: c
            .meters
            .iter()
            .find(|m| m.role == MeterRole::Pv)
            .map(|m| m.id.clone()),
        units: c
            .inverters
            .iter()
            .map(|i| UnitSpec {
                id: i.id.clone(),
                phases: i.ac_phases(),
                rated_w: i.rated_power_w,
                max_charge_w: i.battery().max_charge_w,
                soc_max_pct: i.battery().soc_max_pct,
            })
            .collect(),
    }
}

pub struct Commissioning {
    site: SiteSpec,
    cycle_s: f64,
    slot: CommissionSlot,
    check: Option<WiringCheck>,
    targets: Option<Vec<f64>>,
}

/// What the loop knows of the site this cycle, for the check's preconditions.
pub struct Conditions {
    pub fail_safe: bool,
    pub dr_in_force: bool,
}

impl Commissioning {
    pub fn new(config: &SiteConfig, slot: CommissionSlot) -> Commissioning {
        Commissioning {
            site: spec(config),
            cycle_s: config.control.cycle_ms as f64 / 1000.0,
            slot,
            check: None,
            targets: None,
        }
    }

    /// The battery targets the check holds this cycle, while it runs.
    pub fn targets(&self) -> Option<Vec<f64>> {
        self.targets.clone()
    }

    /// After the cycle at `time`: start a requested check (or refuse it), or take the
    /// cycle's observation into the one under way.
    pub fn cycle(&mut self, time: DateTime<Utc>, obs: &Observation, now: Conditions) {
        let requested = std::mem::take(&mut self.slot.lock().requested);
        if requested && self.check.is_none() {
            let refusal = if now.fail_safe {
                Some("fail-safe is in force: the grid meter cannot be trusted now")
            } else if now.dr_in_force {
                Some("demand response is in force: run the check when no event narrows the site")
            } else if obs.grid_w.is_none() {
                Some("the grid meter has no fresh reading")
            } else {
                None
            };
            if let Some(why) = refusal {
                tracing::warn!("wiring check refused: {why}");
                self.slot.lock().refused = Some(why.to_string());
                return;
            }
            let check = WiringCheck::new(self.site.clone(), obs, self.cycle_s);
            tracing::info!(
                "wiring check started: {} units to nudge, about {} cycles",
                check.progress().1,
                check.cycles()
            );
            let mut s = self.slot.lock();
            *s = CommissionState {
                running: true,
                progress: Some(check.progress()),
                started: Some(time),
                ..CommissionState::default()
            };
            drop(s);
            self.check = Some(check);
        }
        let Some(check) = self.check.as_mut() else {
            return;
        };
        // Demand response or fail-safe that starts meanwhile ends the check: they come first.
        self.targets = if now.fail_safe || now.dr_in_force {
            None
        } else {
            check.step(obs)
        };
        let progress = check.progress();
        if self.targets.is_some() {
            self.slot.lock().progress = Some(progress);
            return;
        }
        let report = check.report();
        let interrupted = !check.is_done();
        self.check = None;
        tracing::info!(
            "wiring check {}: {} checks, all pass: {}",
            if interrupted { "interrupted" } else { "done" },
            report.checks.len(),
            report.all_pass()
        );
        let mut s = self.slot.lock();
        s.running = false;
        s.progress = Some(progress);
        s.finished = Some(time);
        s.refused = interrupted
            .then(|| "interrupted: fail-safe or demand response came into force".to_string());
        s.report = Some(report);
    }
}
