//! The guard loop's side of planning: when to ask for a plan, and which plan is in force.
//! The solve itself runs in the planner's task ([`crate::planner::task`]); here the loop only
//! sends requests and takes outcomes, never waiting for either.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{PlannerConfig, WorkingMode};
use crate::dr::DrEvent;
use crate::planner::task::{PlanRequest, PlannerHandle};
use crate::planner::Plan;
use crate::web::metrics::Metrics;
use crate::web::status::PlanStatus;

/// A failed plan is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// After a change in the DR book, wait until the book has been quiet this long…
const DR_QUIET: Duration = Duration::from_secs(2);
/// …but no longer than this after the first change: a steady stream of events still gets
/// a plan that knows them.
const DR_MOST_DELAY: Duration = Duration::from_secs(10);

/// When to plan: pure bookkeeping on the monotonic clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplanSchedule {
    period: Duration,
    planned_at: Option<Duration>,
    attempted_at: Option<Duration>,
    /// The DR book's generation the newest request was made with.
    dr_seen: Option<u64>,
    /// First and latest DR change not yet planned for.
    dr_first: Option<Duration>,
    dr_last: Option<Duration>,
}

impl ReplanSchedule {
    pub fn new(period: Duration) -> ReplanSchedule {
        ReplanSchedule {
            period,
            ..Default::default()
        }
    }

    /// Note the DR book's generation at `now`.
    pub fn dr_generation(&mut self, now: Duration, generation: u64) {
        match self.dr_seen {
            None => self.dr_seen = Some(generation),
            Some(g) if g != generation => {
                self.dr_seen = Some(generation);
                self.dr_first.get_or_insert(now);
                self.dr_last = Some(now);
            }
            Some(_) => {}
        }
    }

    /// Whether a request is due at `now` (the caller sends none while one is in flight).
    pub fn due(&self, now: Duration) -> bool {
        let since = |t: Option<Duration>| t.map(|t| now.saturating_sub(t));
        let period_up = since(self.planned_at).is_none_or(|a| a >= self.period);
        let retry_ok = since(self.attempted_at).is_none_or(|a| a >= RETRY_AFTER.min(self.period));
        let dr_due = since(self.dr_last).is_some_and(|q| q >= DR_QUIET)
            || since(self.dr_first).is_some_and(|f| f >= DR_MOST_DELAY);
        (period_up && retry_ok) || dr_due
    }

    /// A request went out at `now`: it covers every DR change seen so far.
    pub fn requested(&mut self, now: Duration) {
        self.attempted_at = Some(now);
        self.dr_first = None;
        self.dr_last = None;
    }

    pub fn planned(&mut self, at: Duration) {
        self.planned_at = Some(at);
    }

    pub fn planned_at(&self) -> Option<Duration> {
        self.planned_at
    }
}

/// The plan in force and the planner's state, as the loop keeps them.
pub struct Planning {
    cfg: PlannerConfig,
    mode: WorkingMode,
    handle: PlannerHandle,
    schedule: ReplanSchedule,
    seq: u64,
    /// The request being solved: its number and when it went out.
    in_flight: Option<(u64, Duration)>,
    plan: Option<Arc<Plan>>,
    error: Option<String>,
    solves: u64,
    units: Vec<String>,
}

impl Planning {
    /// `units`: the inverter ids in config order, to match plan targets to units.
    pub fn new(
        cfg: PlannerConfig,
        mode: WorkingMode,
        handle: PlannerHandle,
        units: Vec<String>,
    ) -> Planning {
        Planning {
            units,
            schedule: ReplanSchedule::new(Duration::from_secs_f64(cfg.replan_min * 60.0)),
            cfg,
            mode,
            handle,
            seq: 0,
            in_flight: None,
            plan: None,
            error: None,
            solves: 0,
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.replan_min * 60.0)
    }

    /// The plan is fresh while it is younger than two re-plan periods.
    pub fn fresh_plan(&self, now: Duration) -> Option<&Arc<Plan>> {
        let age = now.saturating_sub(self.schedule.planned_at()?);
        (age <= self.period() * 2).then_some(self.plan.as_ref()?)
    }

    /// One cycle: take a finished plan if there is one, ask for the next when due, and
    /// return plan mode's battery targets per unit (`None`: no fresh plan, which means
    /// self-consumption — never a stale setpoint held).
    pub fn cycle(
        &mut self,
        now: Duration,
        time: DateTime<Utc>,
        soc_pct: impl FnOnce() -> Vec<f64>,
        dr: (u64, Arc<[DrEvent]>),
        metrics: &Metrics,
    ) -> Option<Vec<Option<f64>>> {
        self.take_outcome(now, metrics);
        self.schedule.dr_generation(now, dr.0);
        if self.in_flight.is_none() && self.schedule.due(now) {
            self.seq += 1;
            self.schedule.requested(now);
            self.in_flight = Some((self.seq, now));
            self.handle.request(PlanRequest {
                seq: self.seq,
                time,
                soc_pct: soc_pct(),
                dr_events: dr.1,
            });
        }
        match (self.mode, self.fresh_plan(now)) {
            (WorkingMode::Plan, Some(plan)) => plan
                .targets_for(time, &self.units)
                .map(|t| t.into_iter().map(Some).collect()),
            _ => None,
        }
    }

    fn take_outcome(&mut self, now: Duration, metrics: &Metrics) {
        let Some((seq, asked_at)) = self.in_flight else {
            return;
        };
        let outcome = {
            let latest = self.handle.outcomes.borrow();
            match latest.as_ref() {
                Some(o) if o.seq == seq => o.result.clone(),
                _ => return,
            }
        };
        self.in_flight = None;
        self.solves += 1;
        match outcome {
            Ok(plan) => {
                metrics.observe_plan_solve(&plan);
                self.plan = Some(plan);
                // The plan starts from what was measured when it was asked for.
                self.schedule.planned(asked_at);
                self.error = None;
            }
            Err(e) => {
                tracing::warn!("planning failed, running self-consumption: {e}");
                metrics.count_plan_failure();
                self.error = Some(e);
            }
        }
        let _ = now;
    }

    pub fn status(&self, now: Duration, time: DateTime<Utc>, following: bool) -> PlanStatus {
        let fresh = self.fresh_plan(now);
        let step = fresh.and_then(|plan| plan.step_at(time));
        PlanStatus {
            age_s: self
                .schedule
                .planned_at()
                .map(|t| now.saturating_sub(t).as_secs_f64()),
            following,
            cost: fresh.map(|x| x.cost),
            baseline_cost: fresh.map(|x| x.baseline_cost),
            objective: fresh.map(|x| x.objective),
            solve_ms: fresh.map(|x| x.solve_ms),
            violations: fresh.map_or(0, |x| x.violations.len()),
            error: self
                .error
                .clone()
                .or_else(|| fresh.is_none().then(|| "no fresh plan".to_string())),
            import_price: step.map(|s| s.import_price),
            export_price: step.map(|s| s.export_price),
            battery_w: step.map(|s| s.batteries.iter().map(|b| b.power_w).sum()),
            solves: self.solves,
            solving: self.in_flight.is_some(),
            forecast_quality: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn plans_at_start_then_every_period() {
        let mut s = ReplanSchedule::new(S(900));
        s.dr_generation(S(0), 1);
        assert!(s.due(S(0)));
        s.requested(S(0));
        s.planned(S(0));
        assert!(!s.due(S(899)));
        assert!(s.due(S(900)));
    }

    #[test]
    fn a_failed_plan_is_retried_after_a_minute() {
        let mut s = ReplanSchedule::new(S(900));
        s.requested(S(0));
        assert!(!s.due(S(59)));
        assert!(s.due(S(60)));
    }

    #[test]
    fn a_burst_of_dr_changes_gives_one_request_after_the_book_is_quiet() {
        let mut s = ReplanSchedule::new(S(900));
        s.dr_generation(S(0), 0);
        s.requested(S(0));
        s.planned(S(0));
        let mut requests = 0;
        // A change every 0.5 s for 30 s, then quiet.
        for k in 0..80u64 {
            let now = Duration::from_millis(500 * k);
            if k < 60 {
                s.dr_generation(now, k + 1);
            }
            if s.due(now) {
                requests += 1;
                s.requested(now);
                s.planned(now);
            }
        }
        // One every DR_MOST_DELAY while the stream lasts (at 10 s and 20.5 s), and the
        // last changes in one more (at 31 s): three, not sixty.
        assert_eq!(requests, 3);
    }
}
