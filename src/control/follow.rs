//! Commanded against measured: a unit whose battery does not do what it is told — firmware
//! in another mode, a battery contactor open, a setting the unit ignores — is found here and
//! held, so the others cover its share instead of the site drifting off its limits.

use super::params::UnitParams;

/// A unit marked `not_following` is given its normal share again after this long, to see
/// whether it has recovered.
pub const RETRY_AFTER_S: f64 = 300.0;

/// How close and how soon a battery must follow its setpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FollowRule {
    /// Allowed difference, % of the unit's rating.
    pub tolerance_pct: f64,
    /// How long the difference may last.
    pub after_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FollowWatch {
    /// Per unit: since when it has been off its setpoint.
    off_since: Vec<Option<f64>>,
    /// Per unit: when it was marked not following.
    marked_at: Vec<Option<f64>>,
}

impl FollowWatch {
    /// Compare unit `k`'s measured battery power with what it was told at `now_s`.
    pub fn observe(
        &mut self,
        k: usize,
        now_s: f64,
        unit: &UnitParams,
        rule: FollowRule,
        commanded_w: Option<f64>,
        measured: Option<(f64, f64)>,
    ) {
        if self.off_since.len() <= k {
            self.off_since.resize(k + 1, None);
            self.marked_at.resize(k + 1, None);
        }
        if self.marked_at[k].is_some_and(|t| now_s - t >= RETRY_AFTER_S) {
            self.marked_at[k] = None;
            self.off_since[k] = None;
        }
        let off = match (commanded_w, measured) {
            (Some(cmd), Some((battery_w, soc_pct))) => {
                // At an SOC bound the battery may rightly refuse more in that direction.
                let bound = (cmd < 0.0 && soc_pct >= unit.soc_max_pct - 1.0)
                    || (cmd > 0.0 && soc_pct <= unit.soc_min_pct + 1.0);
                !bound && (cmd - battery_w).abs() > rule.tolerance_pct / 100.0 * unit.rated_w
            }
            // Unknown: no evidence either way.
            _ => false,
        };
        if !off {
            self.off_since[k] = None;
            return;
        }
        let since = *self.off_since[k].get_or_insert(now_s);
        if now_s - since >= rule.after_s && self.marked_at[k].is_none() {
            self.marked_at[k] = Some(now_s);
        }
    }

    pub fn not_following(&self, k: usize) -> bool {
        self.marked_at.get(k).copied().flatten().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Phase;

    fn unit() -> UnitParams {
        UnitParams {
            id: "u".into(),
            rated_w: 10_000.0,
            phases: Phase::ALL.to_vec(),
            max_charge_w: 10_000.0,
            max_discharge_w: 10_000.0,
            soc_min_pct: 10.0,
            soc_max_pct: 100.0,
            step_w: 10.0,
        }
    }

    const RULE: FollowRule = FollowRule {
        tolerance_pct: 10.0,
        after_s: 30.0,
    };

    #[test]
    fn a_unit_off_its_setpoint_for_the_whole_time_is_marked_and_retried_later() {
        let mut w = FollowWatch::default();
        for t in 0..=30 {
            w.observe(0, t as f64, &unit(), RULE, Some(-5000.0), Some((0.0, 50.0)));
            assert_eq!(w.not_following(0), t >= 30, "t={t}");
        }
        w.observe(
            0,
            30.0 + RETRY_AFTER_S,
            &unit(),
            RULE,
            Some(0.0),
            Some((0.0, 50.0)),
        );
        assert!(!w.not_following(0));
    }

    #[test]
    fn following_within_tolerance_or_at_an_soc_bound_is_fine() {
        let mut w = FollowWatch::default();
        for t in 0..100 {
            w.observe(
                0,
                t as f64,
                &unit(),
                RULE,
                Some(-5000.0),
                Some((-4200.0, 50.0)),
            );
            w.observe(
                1,
                t as f64,
                &unit(),
                RULE,
                Some(-5000.0),
                Some((0.0, 100.0)),
            );
            // A brief miss (a ramp) starts the clock again once it is over.
            let measured = if t % 20 < 5 { 0.0 } else { 3000.0 };
            w.observe(
                2,
                t as f64,
                &unit(),
                RULE,
                Some(3000.0),
                Some((measured, 50.0)),
            );
        }
        assert!(!w.not_following(0) && !w.not_following(1) && !w.not_following(2));
    }
}
